"""What /metrics says about the node itself: its process, its version, its certificate."""

from __future__ import annotations

import shutil
from pathlib import Path

from cryptography import x509

from tests.integration.conftest import StartServer
from tests.integration.test_message_load import scrape
from tests.unit.test_ctl_check import make_pair
from xmppd import package_version


def not_after(cert: Path) -> float:
    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()


async def test_process_version_and_certificate_expiry_renewed_by_a_reload(
    start_server: StartServer, tmp_path: Path
) -> None:
    soon = make_pair(tmp_path / "soon", cn="localhost", dns_names=["localhost"], days=20)
    later = make_pair(tmp_path / "later", cn="localhost", dns_names=["localhost"], days=90)
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(soon[0], cert)
    shutil.copy(soon[1], key)
    server = await start_server(tls={"cert": str(cert), "key": str(key)})

    metrics = await scrape(server)
    for sample in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds",
                   "process_cpu_seconds_total", "process_start_time_seconds"):
        assert metrics[sample] > 0, sample
    assert any(name.startswith("python_info") for name in metrics)
    assert metrics[f"xmppd_build_info{{{package_version()}}}"] == 1
    assert metrics[f"xmppd_tls_cert_not_after_seconds{{{cert}}}"] == not_after(soon[0])

    shutil.copy(later[0], cert)  # renewed in place, as certbot does
    shutil.copy(later[1], key)
    await server.reload()
    metrics = await scrape(server)
    assert metrics[f"xmppd_tls_cert_not_after_seconds{{{cert}}}"] == not_after(later[0])
