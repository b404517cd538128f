"""The matchmaker: rq jobs that pair pool requests with available peers, atomically.

Redis state (availability, heartbeats, reservations) is owned by ``registry``; the
jobs in ``jobs`` record outcomes in the database and publish them.
"""
