"""gunicorn entry point: ``gunicorn broker_api.wsgi:app``."""

import logging

from broker_api.app import create_app
from broker_api.settings import Settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
app = create_app(Settings.from_env())
