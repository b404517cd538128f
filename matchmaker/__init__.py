"""The matchmaker: rq jobs that pair pool requests with available peers, atomically.

Redis state (availability, heartbeats, reservations) is owned by
``broker_api.matching.registry``, which the API uses too; the jobs in ``jobs`` record
outcomes in the database and publish them. This package imports ``broker_api``, never
the reverse (``tests/test_layout.py`` checks it).
"""
