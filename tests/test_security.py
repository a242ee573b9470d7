"""Security end to end: a TLS-only redis-server (a throwaway CA made here), the ACL users of
config/redis-acl.example (restricted to slotfill's commands and key prefix), a worker and a
client over ``rediss://``; JSON on the wire and random 128-bit job ids."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from producer import Client, JobStatus, QueueKeys
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import free_port

ACL_EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "redis-acl.example"
QUEUE = "secure"
DENIED = r"(?i)noperm|no permissions|can't access|can't run"
PASSWORDS = {"client": "c-" + "x" * 20, "worker": "w-" + "y" * 20, "admin": "a-" + "z" * 20}


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca_and_server_cert(d: Path) -> tuple[Path, Path, Path]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slotfill test CA")])
    ca = _cert("slotfill test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("127.0.0.1", key, ca_name, ca_key, ca=False)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(_pem_key(key))
    return d / "ca.pem", d / "server.pem", d / "server.key"


class TlsRedis:
    """redis-server with TLS only (no plain port) and the example ACL users."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.port = free_port()
        self.ca, cert, key = make_ca_and_server_cert(d)
        acl = ACL_EXAMPLE.read_text()
        for role, pw in PASSWORDS.items():
            acl = acl.replace(f">CHANGE-ME-{role}", f">{pw}")
        assert not [ln for ln in acl.splitlines() if "CHANGE-ME" in ln and not ln.startswith("#")]
        (d / "users.acl").write_text(acl)
        (d / "redis.conf").write_text("\n".join([
            "port 0", f"tls-port {self.port}", "bind 127.0.0.1", f"dir {d}",
            f"tls-cert-file {cert}", f"tls-key-file {key}", f"tls-ca-cert-file {self.ca}",
            "tls-auth-clients no", f"aclfile {d / 'users.acl'}", 'save ""', "appendonly no",
            f"logfile {d / 'redis.log'}"]) + "\n")
        binary = shutil.which("redis-server")
        assert binary, "redis-server not on PATH"
        self.proc = subprocess.Popen([binary, str(d / "redis.conf")])
        def up() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url("admin")).ping())
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError((d / "redis.log").read_text()) from None
                return False

        wait_until(up, timeout=10, interval=0.05, what=f"TLS redis-server; {d / 'redis.log'}")

    def url(self, role: str, password: str | None = None, ca: bool = True) -> str:
        pw = password if password is not None else PASSWORDS[role]
        user = f"slotfill-{role}" if role != "admin" else "admin"
        q = f"?ssl_ca_certs={self.ca}" if ca else ""
        return f"rediss://{user}:{pw}@127.0.0.1:{self.port}/0{q}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path_factory.mktemp("tls"))
    yield server
    server.stop()


def test_a_job_runs_end_to_end_over_tls_with_restricted_acl_users(
        tls_redis: TlsRedis) -> None:
    w = InprocWorker(tls_redis.url("worker"), "tls-worker", queue=QUEUE, engine="sim",
                     sim_step_ms=10, max_num_seqs=4, headroom=2, lease_seconds=2,
                     heartbeat_seconds=0.5).start()
    c = Client.from_url(tls_redis.url("client"), queue=QUEUE)
    try:
        w.wait_ready(60)
        ids = c.submit_many([{"prompt": f"secret {i}", "max_tokens": 5} for i in range(20)])
        assert all(c.wait(i, timeout=20).status is JobStatus.succeeded for i in ids)
        more = c.submit_many([{"prompt": f"batch {i}", "max_tokens": 5} for i in range(8)])
        assert {r.status for r in c.wait_many(more, timeout=20).values()} == {
            JobStatus.succeeded}  # wait_jobs, BLMPOP: allowed to the client user
        again = c.submit(prompt="idem", max_tokens=3, idempotency_key="k1")
        assert c.submit(prompt="idem", max_tokens=3, idempotency_key="k1").id == again.id
        long = c.submit(prompt="long", max_tokens=400)
        wait_until(lambda: c.status(long.id) is JobStatus.running, interval=0.01,
                   what="the long job to run")
        assert c.cancel(long.id) == "requested"  # SPUBLISH on an allowed channel
        assert c.wait(long.id, timeout=5).status is JobStatus.cancelled
        log = w.log_text()
        assert "NOPERM" not in log and "Traceback" not in log and "redis unavailable" not in log
        assert w.stop(20) == 0
    finally:
        c.close()
        w.stop(10)


def test_the_acl_users_reach_nothing_but_slotfill(tls_redis: TlsRedis) -> None:
    cl = redis.Redis.from_url(tls_redis.url("client"))
    wk = redis.Redis.from_url(tls_redis.url("worker"))
    keys = QueueKeys.for_queue(QUEUE)
    for conn in (cl, wk):
        assert conn.ping()
        for call in (lambda c: c.flushall(), lambda c: c.config_get("*"),
                     lambda c: c.keys("*"), lambda c: c.set("other:key", 1),
                     lambda c: c.get("other:key"), lambda c: c.client_list(),
                     lambda c: c.acl_list(), lambda c: c.shutdown(),
                     lambda c: c.eval("return redis.call('SET', 'other:x', 1)", 0),
                     lambda c: c.eval("return redis.call('FLUSHALL')", 0)):
            with pytest.raises(redis.ResponseError, match=DENIED):
                call(conn)
    # A client cannot act as a worker: no consumer-group reads, no acknowledgements.
    with pytest.raises(redis.exceptions.NoPermissionError):
        cl.xreadgroup("workers", "intruder", {keys.stream("normal"): ">"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        cl.xack(keys.stream("normal"), "workers", "0-1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        cl.publish("other-channel", "x")
    cl.close()
    wk.close()


def test_wrong_credentials_and_plain_connections_are_refused(tls_redis: TlsRedis) -> None:
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(tls_redis.url("client", password="wrong")).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs="
                             f"{tls_redis.ca}").ping()  # the default user is off
    with pytest.raises(redis.ConnectionError):  # plain TCP to the TLS port
        redis.Redis.from_url(f"redis://slotfill-client:{PASSWORDS['client']}@127.0.0.1:"
                             f"{tls_redis.port}/0", socket_timeout=2).ping()
    with pytest.raises(redis.ConnectionError):  # a server certificate nobody vouched for
        redis.Redis.from_url(tls_redis.url("client", ca=False)).ping()


def test_the_wire_carries_json_and_random_128_bit_ids(tls_redis: TlsRedis) -> None:
    c = Client.from_url(tls_redis.url("client"), queue="wire")
    admin = redis.Redis.from_url(tls_redis.url("admin"))
    try:
        ids = c.submit_many([{"prompt": "p", "max_tokens": 2}] * 500)
        assert len(set(ids)) == 500
        assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
        # Bits look uniform: each hex digit position takes many values across 500 ids.
        assert all(len({i[k] for i in ids}) >= 12 for k in range(32))
        for _, fields in admin.xrange(QueueKeys.for_queue("wire").stream("normal"), count=50):
            body = json.loads(fields[b"body"])  # JSON, never pickle
            assert body["prompt"] == "p"
    finally:
        c.close()
        admin.close()


def test_the_worker_acl_user_may_run_every_command_the_lua_steps_call() -> None:
    """Redis checks a script's inner commands against the caller's ACL: a command a step calls
    that the example leaves out fails only when that step runs (APPEND once did, at a job's
    first checkpoint)."""
    called = {m.lower() for f in (ACL_EXAMPLE.parent.parent / "producer" / "lua").rglob("*.lua")
              for m in re.findall(r"""call\(\s*['"]([A-Za-z]+)['"]""", f.read_text())}
    worker = next(ln for ln in ACL_EXAMPLE.read_text().splitlines()
                  if ln.startswith("user slotfill-worker "))
    allowed = {tok[1:].split("|")[0] for tok in worker.split() if tok.startswith("+")}
    assert {"hset", "xadd", "append"} <= called  # the pattern finds the steps' calls
    assert not called - allowed, sorted(called - allowed)
