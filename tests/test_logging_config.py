"""logging_config (Ray Serve's keys) at the top level, per application (YAML) and per
deployment, against real replica and proxy processes; changing it restarts nothing."""

from __future__ import annotations

import json
import os
import textwrap
from typing import Any

import httpx
import pytest
from apps.observe_apps import Front, Inner
from helpers import wait_for

import fleet
from fleet import _api, _cli, _logs
from fleet._deployment import build_plans


def _lines(directory: str, **query: Any) -> list[dict[str, Any]]:
    return _logs.read(directory, **query)


def test_top_level_and_per_deployment_logging_config(tmp_path, capfd):
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0},
                logging_config={"log_level": "warning", "encoding": "JSON",
                                "enable_access_log": False, "logs_dir": str(tmp_path)})
    try:
        inst = _api._instance
        assert isinstance(inst, _api.Instance)
        directory = inst.logs_dir
        assert os.path.dirname(directory) == str(tmp_path)      # logs_dir overrides
        port = fleet.status()["proxies"]["http"]["port"]
        fleet.run(Front.bind(Inner.bind()), name="lc", route_prefix="/lc")
        url = f"http://127.0.0.1:{port}/lc"
        rid = httpx.get(url).headers["x-request-id"]
        # WARNING: the INFO lines are not logged; stdout still is (it is not logging)
        wait_for(lambda: _lines(directory, request_id=rid))
        assert {ln["logger"] for ln in _lines(directory, request_id=rid)} == {"stdout"}
        # no access log: the proxy wrote no line about the request
        assert _lines(directory, system=True, grep=rid) == []
        pid = fleet.status()["applications"]["lc"]["deployments"]["Front"]["replicas"][0][
            "pid"]
        # the deployment's own logging_config, applied in place
        fleet.run(Front.options(logging_config={"log_level": "INFO"}).bind(Inner.bind()),
                  name="lc", route_prefix="/lc")
        rid = httpx.get(url).headers["x-request-id"]
        got = wait_for(lambda: [ln for ln in _lines(directory, request_id=rid)
                                if ln["logger"] == "observe_app"])
        assert [ln["deployment"] for ln in got] == ["Front"]      # Inner stays at WARNING
        replicas = fleet.status()["applications"]["lc"]["deployments"]["Front"]["replicas"]
        assert [r["pid"] for r in replicas] == [pid]                 # not restarted
        # encoding JSON: the console gets the files' JSON lines
        capfd.readouterr()
        fleet.run(Front.options(logging_config={"encoding": "JSON"}).bind(Inner.bind()),
                  name="lc", route_prefix="/lc")
        rid = httpx.get(url).headers["x-request-id"]
        wait_for(lambda: [ln for ln in _lines(directory, request_id=rid)
                          if ln["logger"] == "observe_app"])
        err = capfd.readouterr().err
        console = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
        assert any(c["message"] == "front serving /lc" and c["request_id"] == rid
                   for c in console), err[-2000:]
    finally:
        fleet.shutdown()


def test_bad_logging_config_is_refused_naming_the_key():
    with pytest.raises((ValueError, TypeError), match="log_level"):
        Front.options(logging_config={"log_level": "LOUD"})
    with pytest.raises((ValueError, TypeError), match="encodig"):
        Front.options(logging_config={"encodig": "JSON"})


def test_yaml_logging_config_top_level_and_per_application(tmp_path):
    config = tmp_path / "fleet.yaml"
    config.write_text(textwrap.dedent("""
        logging_config:
          log_level: ERROR
          logs_dir: /tmp/elsewhere
        applications:
          - name: one
            import_path: apps.observe_apps:front
            logging_config:
              log_level: DEBUG
            deployments:
              - name: Inner
                logging_config:
                  encoding: JSON
    """))
    loaded = _cli.load_config(str(config))
    assert loaded.logging_config is not None and loaded.logging_config.log_level == "ERROR"
    ((_cfg, app),) = _cli._load_apps(loaded)
    plans = {p.name: p.config.logging_config for p in build_plans(app, "one")}
    assert plans["Front"] is not None and plans["Front"].log_level == "DEBUG"
    # a deployment's own setting wins over the application's
    assert plans["Inner"] is not None and plans["Inner"].encoding == "JSON"
    assert plans["Inner"].log_level == "INFO"
    bad = tmp_path / "bad.yaml"
    bad.write_text("logging_config:\n  log_levle: INFO\napplications: []\n")
    with pytest.raises(Exception, match="log_levle"):
        _cli.load_config(str(bad))
