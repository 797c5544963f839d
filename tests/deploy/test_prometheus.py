"""deploy/: the Grafana dashboard and the Prometheus rules read only metrics a real server exports.

A real ``emserve serve`` process (the vLLM engine, a tiny random Llama, a metrics port), a real Prometheus
(Debian's ``prometheus`` package, 2.x, installed here when missing) scraping it every second with the job
and rules of ``deploy/prometheus/``, real gRPC traffic through the client (sessions, ingestion,
questions, a failing call). Then every target of every dashboard panel and the query side of every alert
rule, evaluated through Prometheus' HTTP API, returns data: at least one series with a finite value.

``EMSERVE_RENDER_DASHBOARD=PATH``: also drive traffic for ``EMSERVE_RENDER_TRAFFIC_S`` seconds (default 90)
and draw a few panels into the PNG ``PATH`` (``deploy/grafana/render_png.py``; the README's picture).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpc_harness import TINY_MEMORY, random_ids

from emserve.client import Client, ClientError
from emserve.server.cli import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "emserve.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
JOB = "emserve"


def _load_render() -> Any:
    spec = importlib.util.spec_from_file_location("emserve_render_png", ROOT / "deploy" / "grafana" / "render_png.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


render_png = _load_render()


# ---------------------------------------------------------------- fixtures: binaries, server, Prometheus
@pytest.fixture(scope="session")
def prometheus_bin() -> tuple[str, str]:
    """``(prometheus, promtool)``; Debian's ``prometheus`` package is installed when they are missing."""
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if prom and tool:
        return prom, tool
    if not shutil.which("apt-get"):
        pytest.skip("prometheus/promtool missing and no apt-get to install them")
    if os.geteuid() != 0:
        pytest.skip("prometheus/promtool missing; installing Debian's package needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    assert prom and tool, "apt-get installed prometheus but the binaries are not on PATH"
    return prom, tool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(pred: Any, timeout: float, what: str, poll: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


class Server:
    """A real ``emserve serve`` process with the vLLM engine and a metrics port."""

    def __init__(self, model: Path, folder: Path) -> None:
        memory = [f"--memory={k}={v}" for k, v in TINY_MEMORY.items()]
        self.log = folder / "server.log"
        self.proc = ServerProcess(folder / "sessions", self.log, [
            "--backend", "vllm", "--model", str(model), "--dtype", "float32", "--max-model-len", "1024",
            "--kv-cache-gib", "1", "--metrics-port", "0", "--grace", "2", "--max-disk-gib", "1", *memory])
        self.address = ""
        self.metrics = ""

    def start(self) -> None:
        self.address = self.proc.wait_listening(120)

        def metrics_line() -> str | None:
            m = re.search(r"emserve metrics on http://(\S+)/metrics", self.log.read_text())
            return m.group(1) if m else None

        self.metrics = _wait_for(metrics_line, 30, f"the metrics port in {self.log}")

    def stop(self) -> None:
        self.proc.stop(60)


class Prometheus:
    """A real Prometheus with deploy/prometheus/prometheus.yml's job and rules,
    scraping ``target`` and evaluating the rules every second."""

    def __init__(self, binary: str, target: str, folder: Path) -> None:
        cfg = yaml.safe_load(PROM_CONFIG.read_text())
        cfg["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
        cfg["rule_files"] = [str(ALERTS)]
        jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
        assert len(jobs) == 1 and "static_configs" in jobs[0]
        jobs[0]["static_configs"] = [{"targets": [target]}]
        cfg["scrape_configs"] = jobs
        config = folder / "prometheus.yml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.log_path = folder / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, ConnectionError):
                return False

        try:
            _wait_for(ready, 60, "prometheus ready")
        except BaseException:
            self.stop()
            raise

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: a bad query; the body says why
            body = json.load(e)
        return body

    def query(self, expr: str) -> dict[str, Any]:
        return dict(self.api("query", query=expr))

    def value(self, expr: str) -> float | None:
        body = self.query(expr)
        res = body.get("data", {}).get("result", [])
        return float(res[0]["value"][1]) if res else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, prometheus_bin: tuple[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Prometheus]]:
    """The server (its engine loading in the background) and a Prometheus scraping it from the start."""
    pytest.importorskip("vllm")
    folder = tmp_path_factory.mktemp("deploy-prometheus")
    server = Server(tiny_model_dir, folder)
    prom: Prometheus | None = None
    try:
        server.start()
        prom = Prometheus(prometheus_bin[0], server.metrics, folder)
        yield server, prom
    finally:
        try:
            if prom is not None:
                prom.stop()
        finally:
            server.stop()


# ---------------------------------------------------------------- traffic
def drive(client: Client, *, sessions: int, tokens: int, questions: int, seed: int) -> int:
    """Sessions that ingest ``tokens`` each and answer ``questions``, plus one failing call (NOT_FOUND);
    returns the tokens ingested."""
    rng = random.Random(seed)
    for i in range(sessions):
        sid = f"s{seed}-{i}"
        client.create_session(sid)
        client.ingest_tokens(sid, random_ids(tokens, seed * 100 + i), piece_tokens=rng.choice((48, 64, 128)))
        for q in range(questions):
            client.ask(sid, random_ids(6, seed * 1000 + q), max_tokens=rng.randint(4, 12), ignore_eos=True)
        client.get_session(sid)
    with pytest.raises(ClientError):
        client.get_session(f"absent-{seed}")
    return sessions * tokens


def drive_for(client: Client, seconds: float) -> int:
    """Traffic with a shape for the picture: rounds of varied size and pauses, sessions deleted now and then."""
    rng = random.Random(7)
    end, total, n = time.monotonic() + seconds, 0, 0
    while time.monotonic() < end:
        n += 1
        total += drive(client, sessions=rng.randint(1, 3), tokens=rng.choice((160, 320, 640)),
                       questions=rng.randint(0, 3), seed=100 + n)
        if n % 4 == 0:
            for s in list(client.list_sessions())[: rng.randint(1, 3)]:
                client.delete_session(s.session_id)
        time.sleep(rng.choice((0.0, 0.5, 2.0, 5.0)))
    return total


# ---------------------------------------------------------------- expressions
_CMP = re.compile(r"==|!=|>=|<=|>|<")


def query_side(expr: str) -> str:
    """For ``<query> <op> <scalar>`` (op a comparison, ``bool`` allowed, at the top level), the query;
    otherwise ``expr``. Brackets, braces and strings are skipped (label matchers, ranges)."""
    depth, i, last = 0, 0, None
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            j = expr.index(c, i + 1)
            while expr[j - 1] == "\\":
                j = expr.index(c, j + 1)
            i = j + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            m = _CMP.match(expr, i)
            if m:
                last = (i, m.end())
                i = m.end()
                continue
        i += 1
    if last is None:
        return expr.strip()
    lhs, rhs = expr[: last[0]], expr[last[1]:]
    rhs = re.sub(r"^\s*bool\b", "", rhs)
    if not re.fullmatch(r"[\d\s.eE+\-*/%^()]+", rhs):
        return expr.strip()  # the right side reads series: not a threshold
    return lhs.strip()


def check_returns_data(prom: Prometheus, expr: str) -> str | None:
    """None when ``expr`` returns at least one series with a finite value; else why not."""
    body = prom.query(expr)
    if body.get("status") != "success":
        return f"error: {body.get('errorType')}: {body.get('error')}"
    data = body["data"]
    if data["resultType"] == "scalar":
        vals = [float(data["result"][1])]
    else:
        vals = [float(s["value"][1]) for s in data["result"]]
    if not vals:
        return "no data"
    if not any(math.isfinite(v) for v in vals):
        return f"only non-finite values {vals[:5]}"
    return None


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


# ---------------------------------------------------------------- tests without a server
def test_query_side() -> None:
    assert query_side('up{job="emserve"} == 0') == 'up{job="emserve"}'
    assert query_side("sum(x) / (500 * 1024^3)\n> 0.85") == "sum(x) / (500 * 1024^3)"
    assert query_side('rate(a{c!="OK", d=~"x|y"}[5m]) > bool 1e-3') == 'rate(a{c!="OK", d=~"x|y"}[5m])'
    assert query_side("a > b") == "a > b"
    assert query_side("histogram_quantile(0.9, sum by (le) (rate(h[5m])))") == \
        "histogram_quantile(0.9, sum by (le) (rate(h[5m])))"


def test_dashboard_is_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text())
    templ = {v["name"]: v for v in board["templating"]["list"]}
    assert templ["datasource"]["type"] == "datasource" and templ["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert templ[name]["datasource"]["uid"] == "${datasource}"
    panels = board["panels"]
    ids = [p["id"] for p in panels] + [c["id"] for p in panels for c in p.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= g.keys() and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p.get("title") and p.get("description"), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]
            assert "[$__rate_interval]" in t["expr"] or "rate(" not in t["expr"], (p["title"], t["expr"])
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]


@pytest.mark.slow  # Debian's prometheus is installed on first use
def test_promtool_checks_rules_and_config(prometheus_bin: tuple[str, str]) -> None:
    promtool = prometheus_bin[1]
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout + r.stderr
    r = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for rule in rules():
        assert rule["alert"].startswith("Emserve") and rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]


# ---------------------------------------------------------------- the acceptance
@pytest.mark.slow  # the vLLM engine (~40 s to load); Debian's prometheus is installed on first use
@pytest.mark.timeout(900)
def test_every_panel_and_rule_reads_existing_metrics(stack: tuple[Server, Prometheus]) -> None:
    server, prom = stack
    with Client(server.address, timeout=120) as client:
        client.wait_ready(timeout=300)
        t_traffic = time.time()
        ingested = drive(client, sessions=2, tokens=320, questions=2, seed=1)
        render_to = os.environ.get("EMSERVE_RENDER_DASHBOARD")
        if render_to:
            ingested += drive_for(client, float(os.environ.get("EMSERVE_RENDER_TRAFFIC_S", "90")))
    # a scrape after the last call, then a few more (rates need two samples; rules evaluate every second)
    _wait_for(lambda: prom.value(f'sum(emserve_ingested_tokens_total{{job="{JOB}"}})') == ingested, 30,
              "prometheus scraped the traffic")
    time.sleep(4)
    targets = prom.api("targets")["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    # vLLM's metrics arrive under their own names: Prometheus 2.x asks for OpenMetrics without allow-utf-8,
    # and the server answers in the classic text format, where the colons survive (server/metrics.py)
    assert prom.value(f'count(vllm:num_requests_running{{job="{JOB}"}})') == 1

    # every dashboard target; $__rate_interval spans the traffic, so every rate has something to say
    window = f"{math.ceil(time.time() - t_traffic) + 10}s"
    failures = []
    n_targets = 0
    for panel in render_png.panels(json.loads(DASHBOARD.read_text())):
        for target in panel["targets"]:
            n_targets += 1
            expr = render_png.expand(target["expr"], rate_interval=window, interval="1s", range_=window)
            assert "$" not in expr, expr
            why = check_returns_data(prom, expr)
            if why:
                failures.append(f"panel {panel['title']!r} {target['refId']}: {why}\n    {expr}")
    assert n_targets >= 40
    # every alert rule: the whole expression parses and evaluates; its query side returns data
    all_rules = rules()
    for rule in all_rules:
        body = prom.query(rule["expr"])
        if body.get("status") != "success":
            failures.append(f"rule {rule['alert']}: {body.get('error')}")
        side = query_side(rule["expr"])
        why = check_returns_data(prom, side)
        if why:
            failures.append(f"rule {rule['alert']} (query side): {why}\n    {side}")
    # ... and Prometheus itself evaluates them without error
    loaded = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in all_rules)
    for r in loaded:
        if r["health"] != "ok":
            failures.append(f"rule {r['name']}: health {r['health']}: {r.get('lastError')}")
    assert not failures, "\n".join(failures)

    if render_to:
        out = render_png.render(prom.url, render_to, start=t_traffic - 15, end=time.time(), step=2,
                                rate_interval="20s")
        assert out.stat().st_size < 300 * 1024
