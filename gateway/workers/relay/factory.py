"""The target the settings name: a signed webhook for `http(s)://`, a RabbitMQ queue for
`amqp(s)://` (the URL and secret are checked when the settings are read)."""

from __future__ import annotations

from urllib.parse import urlsplit

from gateway.setting import BROKER_SCHEMES
from gateway.settings import ConfigError, Settings
from gateway.workers.relay.target import Target

TIMEOUT_S = 10.0  # one delivery's wait for the target's answer (a 2xx, a publisher confirm)


def target_for(settings: Settings) -> Target:
    url = settings.relay_url
    if not url:
        raise ConfigError("FLASHGATE_RELAY_URL is not set: the relay has no target")
    if urlsplit(url).scheme in BROKER_SCHEMES:
        from gateway.workers.relay.rabbitmq import RabbitTarget

        return RabbitTarget(
            url, settings.relay_queue, max_length=settings.queue_max, timeout_s=TIMEOUT_S
        )
    from gateway.workers.relay.webhook import WebhookTarget

    return WebhookTarget(url, settings.relay_secret or "", timeout_s=TIMEOUT_S)
