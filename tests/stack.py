"""The Procfile launcher the tests share with the demo (see ``scripts.stack``)."""

from scripts.stack import Process, free_port, procfile, wait_http

__all__ = ["Process", "free_port", "procfile", "wait_http"]
