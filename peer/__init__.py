"""Compute Broker peer: the contributor daemon, its sandbox, and the requester library."""
