"""Webhook targets are not an SSRF or port-scanning tool: internal addresses are refused at registration
and again at send time on the resolved address, which is the one the request then connects to."""

from __future__ import annotations

import json

import httpx
import pytest

from app.core.settings import get_settings
from app.core.webhook_targets import PinnedTarget, TargetForbidden, resolve_target
from app.core.webhooks import Outgoing, Pass, _post, deliver_due
from tests.app.test_api import _job, onnx_model  # noqa: F401 - fixture
from tests.helpers.webhooks import http_receiver, self_signed_localhost

INTERNAL_SPELLINGS = [
    "http://127.0.0.1/",
    "http://0.0.0.0/",
    "http://[::1]/",
    "http://2130706433/",  # 127.0.0.1 as one integer
    "http://0x7f000001/",  # hex
    "http://0177.0.0.1/",  # octal
    "http://127.1/",  # short form
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped IPv6
    "http://[::ffff:169.254.169.254]/",
    "http://[::]/",
    "http://localhost:8080/",  # a name that resolves to loopback
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://224.0.0.1/",  # multicast
    "http://240.0.0.1/",  # reserved
    "http://255.255.255.255/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[ff02::1]/",
    "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "https://127.0.0.1:8443/",
]


@pytest.mark.parametrize("url", INTERNAL_SPELLINGS)
def test_internal_targets_are_refused_at_registration(api, url: str) -> None:  # type: ignore[no-untyped-def]
    response = api.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "webhook_target_forbidden"
    assert api.get("/v1/webhooks").json() == []


@pytest.mark.parametrize("url", INTERNAL_SPELLINGS)
def test_every_spelling_is_refused_by_the_send_time_check(url: str) -> None:
    """The same check on the raw string (a row stored before this check existed is not normalised)."""
    with pytest.raises(TargetForbidden):
        resolve_target(url, allow_private=False)


@pytest.mark.parametrize(
    "url",
    ["http://user:pass@8.8.8.8/", "http://user@8.8.8.8/", "ftp://8.8.8.8/", "file:///etc/passwd"],
)
def test_only_http_and_https_without_credentials(api, url: str) -> None:  # type: ignore[no-untyped-def]
    response = api.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] in {"webhook_target_forbidden", "invalid_request"}
    with pytest.raises(TargetForbidden):
        resolve_target(url, allow_private=True)


def test_a_url_without_host_or_a_name_that_does_not_resolve_is_refused(api) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TargetForbidden):
        resolve_target("http:///x", allow_private=True)
    response = api.post("/v1/webhooks", json={"url": "https://hook.example.invalid/x"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "webhook_target_unresolvable"


def test_public_addresses_are_accepted(api) -> None:  # type: ignore[no-untyped-def]
    response = api.post("/v1/webhooks", json={"url": "https://8.8.8.8:8443/hooks/modelpress"})
    assert response.status_code == 201, response.text
    target = resolve_target("http://[2001:4860:4860::8888]/x", allow_private=False)
    assert target.ips == ("2001:4860:4860::8888",)


def test_the_operator_may_allow_private_targets(service_env, make_api) -> None:  # type: ignore[no-untyped-def]
    service_env(MODELPRESS_WEBHOOK_ALLOW_PRIVATE_TARGETS="true")
    api = make_api()
    assert api.post("/v1/webhooks", json={"url": "http://10.1.2.3:8080/hook"}).status_code == 201
    assert api.post("/v1/webhooks", json={"url": "http://u:p@10.1.2.3/"}).status_code == 422


def test_a_name_resolving_internal_is_refused_at_send_time(service_env, make_api, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Registered while allowed (or before its name pointed inside); refused when sending, never probed."""
    service_env(MODELPRESS_WEBHOOK_ALLOW_PRIVATE_TARGETS="true")
    api = make_api()
    model = api.upload("/v1/models", _tiny(tmp_path)).json()
    with http_receiver() as receiver:
        url = f"http://localhost:{receiver.port}/hook"
        hook = api.post("/v1/webhooks", json={"url": url, "events": ["job.queued"]}).json()
        _job(api, model["id"])
        monkeypatch.setenv("MODELPRESS_WEBHOOK_ALLOW_PRIVATE_TARGETS", "false")
        get_settings.cache_clear()
        assert deliver_due() == {"delivered": 0, "retry": 0, "failed": 1}
    assert receiver.requests == [], "a refused target is not contacted"
    (entry,) = api.get(f"/v1/webhooks/{hook['id']}/deliveries").json()
    assert entry["status"] == "failed" and entry["last_error"].startswith("target_forbidden")
    assert entry["last_status_code"] is None and entry["duration_ms"] is None


def test_the_send_connects_to_the_checked_address_with_the_original_host(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """HTTP: Host header keeps the name. HTTPS: the certificate is checked against the name (SNI), not the IP."""
    service_env(MODELPRESS_WEBHOOK_ALLOW_PRIVATE_TARGETS="true")
    api = make_api()
    model = api.upload("/v1/models", _tiny(tmp_path)).json()
    server_tls, client_tls = self_signed_localhost(tmp_path)
    with http_receiver() as plain, http_receiver(tls=server_tls) as secure:
        for receiver, scheme in ((plain, "http"), (secure, "https")):
            api.post("/v1/webhooks", json={"url": f"{scheme}://localhost:{receiver.port}/hook"})
        _job(api, model["id"])
        with httpx.Client(verify=client_tls) as client:
            assert deliver_due(client=client) == {"delivered": 2, "retry": 0, "failed": 0}
    for receiver in (plain, secure):
        ((headers, body),) = receiver.requests
        assert headers["host"] == f"localhost:{receiver.port}"
        assert json.loads(body)["event"] == "job.queued"


def test_a_refused_address_falls_back_to_the_next_checked_one(service_env) -> None:  # type: ignore[no-untyped-def]
    """A name with an address the receiver does not listen on (IPv6 here) still reaches it on the next one."""
    service_env()
    with http_receiver() as receiver:
        target = PinnedTarget(url=httpx.URL(f"http://localhost:{receiver.port}/hook"), ips=("::1", "127.0.0.1"))
        item = Outgoing("delivery", "project", str(target.url), "secret", "job.queued", b"{}", attempts=1)
        status, error, _ = _post(item, target, Pass("token", get_settings(), last_start=0.0, client=None))
    assert (status, error) == (204, None) and len(receiver.requests) == 1


def _tiny(tmp_path):  # type: ignore[no-untyped-def]
    from tests.helpers import files

    return files.tiny_onnx(tmp_path / "tiny.onnx")
