"""What the broker API and the matchmaker share: Redis keys, the availability registry,
the job queues, and rebuilding Redis from the database.

It lives here, not in ``matchmaker``, so that the packages import one way only: the
matchmaker imports ``broker_api`` (these modules and the models), never the reverse. The
API enqueues matchmaker jobs by dotted name (``matchmaker.jobs.match_session``), so it
needs none of their code.
"""
