"""deploy/monitoring/prometheusrule.yaml: the alert rules are the documented ones, pass
`promtool check rules` and their `promtool` unit tests, and those tests catch the rule mistakes
that would page for a finished run or stay silent for a dead one.

promtool comes with Debian's `prometheus` package (.ci/run installs it); without it the tests
fail in CI and skip elsewhere (manifest_support.tool).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from manifest_support import NAMESPACE
from monitoring_support import (
    RULES_FILE,
    RULES_TEST,
    alert_rules,
    promtool,
    recorded_names,
    rule_groups,
)  # fmt: skip

# --- Alert rules ---------------------------------------------------------------------------------

ALERTS = {
    "MetatrainerTrainingStalled",
    "MetatrainerThroughputDropped",
    "MetatrainerDataWaitHigh",
    "MetatrainerCheckpointSlow",
    "MetatrainerCheckpointMissing",
    "MetatrainerWorkerRestarted",
    "MetatrainerWorkersRestartingRepeatedly",
    "MetatrainerRunErrored",
    "MetatrainerWorkersNotStarting",
    "MetatrainerRayJobFailed",
    "MetatrainerWorkersGone",
}
# What MetatrainerWorkersGone compares: when each run's workers, and each RayJob's completion,
# were last seen.
RECORDS = {
    "rayjob_run:metatrainer_workers_seen:timestamp",
    "rayjob:kuberay_job_complete:timestamp",
}


def test_rules_are_the_documented_alerts_each_with_severity_and_text():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    assert recorded_names() == RECORDS
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert {"summary", "description"} <= r["annotations"].keys(), r["alert"]


@pytest.fixture
def rules_dir(tmp_path) -> Path:
    """The PrometheusRule's spec as a plain rules file, beside a copy of the unit tests."""
    (tmp_path / "metatrainer-rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    return tmp_path


def test_promtool_checks_the_rules(rules_dir):
    done = promtool("check", "rules", rules_dir / "metatrainer-rules.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in done.stdout


def test_promtool_unit_tests_pass(rules_dir):
    done = promtool("test", "rules", rules_dir / RULES_TEST.name)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert tested == ALERTS  # every alert has a unit test


def promtool_test_with(rules_dir: Path, alert: str, change) -> str:
    """`promtool test rules` with `alert`'s expression changed by `change`; its output, after
    checking that the unit tests failed."""
    spec = rule_groups()
    (rule,) = [r for g in spec["groups"] for r in g["rules"] if r.get("alert") == alert]
    changed = change(rule["expr"])
    assert changed != rule["expr"], "the change must change the rule"
    rule["expr"] = changed
    (rules_dir / "metatrainer-rules.yaml").write_text(yaml.safe_dump(spec))
    done = promtool("test", "rules", rules_dir / RULES_TEST.name)
    assert done.returncode != 0, done.stdout
    return done.stdout + done.stderr


def test_promtool_unit_tests_catch_a_broken_rule(rules_dir):
    """A stalled-training alert that forgets "the workers are up" fires for a finished run."""
    out = promtool_test_with(
        rules_dir, "MetatrainerTrainingStalled", lambda e: re.split(r"\s+and on ", e)[0]
    )
    assert 'run="done"' in out, out


def test_a_run_in_its_final_evaluation_does_not_page(rules_dir):
    """Without its evaluation clause, the stalled alert pages for a run scoring its test split."""
    out = promtool_test_with(
        rules_dir, "MetatrainerTrainingStalled", lambda e: re.split(r"\s+unless on ", e)[0]
    )
    assert 'run="final"' in out, out


def test_a_run_whose_workers_vanished_pages_at_60_minutes(rules_dir):
    """The gap of every worker-based alert: with the workers' series gone, only
    MetatrainerWorkersGone fires; stripped of its "gone" test it never does."""
    out = promtool_test_with(
        rules_dir, "MetatrainerWorkersGone", lambda e: e.replace("unless", "and", 1)
    )
    assert "alertname: MetatrainerWorkersGone, time: 1h," in out, out
    assert 'run="lost"' in out, out


@pytest.mark.parametrize(
    "forget",
    [
        # Without "unless its RayJob completed": pages after every finished run.
        lambda e: re.split(r"\s+unless on \(namespace, rayjob, run\)", e)[0],
        # "Its RayJob was Complete at some time in 6 h", not "after its workers were last seen":
        # silent for the next run of a RayJob that once completed.
        lambda e: e.replace(
            "max_over_time(rayjob_run:metatrainer_workers_seen:timestamp[6h])\n  <=",
            "0 * max_over_time(rayjob_run:metatrainer_workers_seen:timestamp[6h])\n  <=",
        ),
    ],
    ids=["pages-after-a-finished-run", "silent-after-a-rayjob-reused"],
)
def test_workers_gone_is_quiet_exactly_for_runs_whose_rayjob_completed(rules_dir, forget):
    out = promtool_test_with(rules_dir, "MetatrainerWorkersGone", forget)
    assert "alertname: MetatrainerWorkersGone" in out, out


def test_an_errored_run_seen_by_one_scrape_pages(rules_dir):
    """ERRORED is there for one scrape before the controller exits: an alert on the state now
    would miss it."""
    out = promtool_test_with(
        rules_dir,
        "MetatrainerRunErrored",
        lambda e: re.sub(r"max_over_time\((.*)\[30m\]\)", r"\1", e),
    )
    assert 'run="crashed"' in out, out


def test_rayjob_alert_watches_the_namespace_of_deploy_base():
    (rule,) = [r for r in alert_rules() if r["alert"] == "MetatrainerRayJobFailed"]
    assert f'namespace="{NAMESPACE}"' in rule["expr"]
    assert yaml.safe_load(RULES_FILE.read_text())["metadata"]["namespace"] == NAMESPACE
