"""The Kubernetes settings of docs/pipeline.md, validated without a cluster.

The two YAML blocks of docs/pipeline.md ("Kubernetes"), read from the page itself so the docs
cannot drift: the instance's `run_launcher` against K8sRunLauncher's config schema, the run
config's `execution` against the `config_assets` job built with `MLSAE_EXECUTOR=k8s`, and the
Kubernetes Job the executor would submit for a training step, built by dagster-k8s itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def doc_blocks() -> tuple[dict, dict]:
    """(the dagster.yaml block, the run-config block) of docs/pipeline.md's Kubernetes part."""
    text = (ROOT / "docs" / "pipeline.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    instance = next(b for b in blocks if isinstance(b, dict) and "run_launcher" in b)
    run_config = next(b for b in blocks if isinstance(b, dict) and "execution" in b)
    return instance, run_config


def in_k8s_definitions(code: str, block_dagster_k8s: bool = False) -> dict:
    """Run `code` (which sets `result`) after importing the definitions with
    MLSAE_EXECUTOR=k8s, in a fresh process: the executor is chosen at import."""
    block = "import sys; sys.modules['dagster_k8s'] = None\n" if block_dagster_k8s else ""
    script = (
        f"{block}import json, warnings\nwarnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import mlsae_pipeline.definitions as d\n"
        f"{code}\nresult['warnings'] = [str(w.message) for w in caught]\n"
        "print(json.dumps(result))"
    )
    env = {**os.environ, "MLSAE_EXECUTOR": "k8s", "MLSAE_SWEEP": "smoke"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_run_launcher_block_matches_k8s_run_launcher_schema() -> None:
    from dagster._config import validate_config
    from dagster_k8s import K8sRunLauncher

    instance, _ = doc_blocks()
    launcher = instance["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    ok = validate_config(K8sRunLauncher.config_type(), launcher["config"])
    assert ok.success, [e.message for e in ok.errors]
    broken = {**launcher["config"], "job_imag": "typo"}
    bad = validate_config(K8sRunLauncher.config_type(), broken)
    assert not bad.success and "job_imag" in str([e.message for e in bad.errors])


def test_executor_run_config_validates_against_the_k8s_job() -> None:
    _, run_config = doc_blocks()
    code = f"""
import dagster as dg
job = d.defs.resolve_job_def("config_assets")
run_config = {run_config!r}
dg.validate_run_config(job, run_config)  # raises DagsterInvalidConfigError if it does not fit
bad = {{"execution": {{"config": {{**run_config["execution"]["config"], "max_concurent": 2}}}}}}
try:
    dg.validate_run_config(job, bad)
    bad_error = None
except dg.DagsterInvalidConfigError as e:
    bad_error = str(e)
result = {{"executor": job.executor_def.name, "steps": sorted(job.graph.node_dict),
          "bad_error": bad_error}}
"""
    got = in_k8s_definitions(code)
    assert got["executor"] == "k8s", got
    assert not got["warnings"], got["warnings"]
    assert got["bad_error"] and "max_concurent" in got["bad_error"]
    per_step = run_config["execution"]["config"]["per_step_k8s_config"]
    assert set(per_step) <= set(got["steps"]), (per_step, got["steps"])
    assert "mlsae" in per_step  # the training step is the one that asks for a GPU


def test_without_dagster_k8s_the_definitions_load_on_the_multiprocess_executor() -> None:
    code = 'result = {"executor": d.defs.resolve_job_def("config_assets").executor_def.name}'
    got = in_k8s_definitions(code, block_dagster_k8s=True)
    assert got["executor"] == "multiprocess"
    assert any("dagster-k8s is not installed (pip install .[k8s])" in w for w in got["warnings"])


def test_training_step_pod_is_built_from_both_blocks() -> None:
    """The Job dagster-k8s would submit for one `mlsae` step: the launcher's settings, the
    executor's step settings, then the per-step ones merged over them (as its executor
    does), through `construct_dagster_k8s_job`; every dict becomes a kubernetes model."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
    )

    instance, run_config = doc_blocks()
    launcher = instance["run_launcher"]["config"]
    execution = run_config["execution"]["config"]
    context = K8sContainerContext(
        image_pull_policy=launcher["image_pull_policy"],
        service_account_name=launcher["service_account_name"],
        env_vars=launcher["env_vars"],
        volume_mounts=launcher["volume_mounts"],
        volumes=launcher["volumes"],
        namespace=launcher["job_namespace"],
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(launcher["run_k8s_config"]),
    )
    for layer in (execution["step_k8s_config"], execution["per_step_k8s_config"]["mlsae"]):
        step = UserDefinedDagsterK8sConfig.from_dict(layer)
        context = context.merge(K8sContainerContext(run_k8s_config=step))
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image=launcher["job_image"], dagster_home="/opt/dagster/home"),
        args=["dagster", "api", "execute_step"],
        job_name="mlsae-step-test",
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/op": "mlsae"},
    )
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == launcher["job_image"]
    assert container.image_pull_policy == launcher["image_pull_policy"]
    assert pod.service_account_name == launcher["service_account_name"]
    assert pod.node_selector == {"gpu": "true"}
    limits, requests = container.resources.limits, container.resources.requests
    assert str(limits["nvidia.com/gpu"]) == "1" and limits["memory"] == "32Gi"  # quantities
    assert requests == {"cpu": "2", "memory": "8Gi"}
    (volume,) = pod.volumes
    assert volume.persistent_volume_claim.claim_name == "mlsae-data"
    (mount,) = container.volume_mounts
    assert (mount.name, mount.mount_path) == (volume.name, "/data")
    env = {e.name: e.value for e in container.env}
    assert env["MLSAE_EXECUTOR"] == "k8s" and env["MLSAE_DATA_DIR"] == mount.mount_path
