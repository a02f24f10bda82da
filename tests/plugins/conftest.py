"""Fixtures with real parts: an HTTP webhook receiver (the SMTP sink is in tests/conftest.py),
and the built-in plugins configured to use them."""
from __future__ import annotations

import pytest

from engine.plugin_host import PluginHost
from tests.plugins.helpers import REPLY_SECRET, WEBHOOK_SECRET, Clinic, WebhookSink


@pytest.fixture
def webhook_sink():
    sink = WebhookSink(WEBHOOK_SECRET)
    sink.thread.start()
    try:
        yield sink
    finally:
        sink.server.shutdown()
        sink.server.server_close()


@pytest.fixture
def slotengine_plugins() -> PluginHost:
    """The built-in plugins, registered as in production (no vendor discovery)."""
    return PluginHost(discover=False)


@pytest.fixture
def slotengine_plugin_settings(smtp_sink, webhook_sink) -> dict:
    return {
        "channels": {
            "email": {"host": "127.0.0.1", "port": smtp_sink.port, "sender": "clinic@example.org"},
            "sms": {"url": webhook_sink.url, "secret": WEBHOOK_SECRET},
        },
        "reminders": {"clinic_name": "Main Street Clinic", "reply_secret": REPLY_SECRET,
                      "reply_url": "https://portal.example.org/reply"},
        "waitlist_fill": {"clinic_name": "Main Street Clinic", "reply_secret": REPLY_SECRET},
        "notices": {"teams": {
            "default": {"channel": "email", "address": "staff@clinic.example.org"},
            "billing": {"channel": "email", "address": "billing@clinic.example.org"},
            "front_desk": {"channel": "email", "address": "desk@clinic.example.org"},
            "referrals": {"channel": "email", "address": "referrals@clinic.example.org"},
        }, "labs_before_types": ["procedure"]},
        "eligibility": {"payers": {
            "ACME": {"network": "acme-ppo", "prior_auth_types": ["procedure"],
                     "copay": {"default": 25, "new_patient": 40}},
        }},
        "referrals": {"networks": {"ACME": "acme-ppo"}},
        "instructions": {"bring": ["Photo ID", "Insurance card"],
                         "types": {"procedure": ["Do not eat for 8 hours before."]}},
    }


@pytest.fixture
def clinic(slotengine_scheduler, slotengine_context) -> Clinic:
    """The demo clinic with networks, once the plugins are configured."""
    return Clinic(slotengine_scheduler)
