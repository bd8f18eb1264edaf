"""WSGI entry point: ``gunicorn sim_backend.wsgi:app`` (settings from the environment)."""
import logging

from .app import create_app
from .settings import Settings

_settings = Settings.from_env()
logging.basicConfig(level=_settings.log_level,
                    format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
app = create_app(_settings)
