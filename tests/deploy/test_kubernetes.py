"""Kubernetes and KServe manifests: schema-valid offline, and consistent with the service."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from service.healthcheck import LIVE_PATH, READY_PATH

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
K8S_VERSION = "1.37.0"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "hpa.yaml"])
def test_core_manifests_validate_strictly(name):
    kubernetes_validate.validate(load(name), K8S_VERSION, strict=True)


def test_kserve_container_validates_as_a_pod_container():
    """The CRD itself has no bundled schema; its container spec is a core v1 Container."""
    isvc = load("kserve-inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    (container,) = isvc["spec"]["predictor"]["containers"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check"},
        "spec": {"containers": [container]},
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PROTOCOL"] == "v2"
    assert container["readinessProbe"]["httpGet"]["path"] == READY_PATH
    assert container["ports"][0]["containerPort"] == int(env["BNFOLD_PORT"])


def test_an_invalid_manifest_is_caught():
    """The validator really checks: a string where an int belongs fails."""
    bad = load("deployment.yaml")
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_deployment_probes_port_and_drain_agree_with_the_server():
    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = Settings(**{k.removeprefix("BNFOLD_").lower(): v for k, v in env.items()})
    assert container["ports"][0]["containerPort"] == settings.port
    assert container["livenessProbe"]["httpGet"]["path"] == LIVE_PATH
    assert container["readinessProbe"]["grpc"]["port"] == settings.grpc_port  # same readiness
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = settings.drain_timeout_s
    assert float(env["BNFOLD_DRAIN_TIMEOUT_S"]) == drain
    # Kubernetes kills the pod after the grace period: it must cover preStop + the drain.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain
    assert pod["securityContext"]["runAsUser"] == 10001
