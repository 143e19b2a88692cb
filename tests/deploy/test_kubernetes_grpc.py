"""The gRPC side of the manifests: ports, the gRPC readiness probe, and the h2c InferenceService
agree with the service's settings, and validate against the Kubernetes schemas."""

from __future__ import annotations

import kubernetes_validate

from service.config import Settings
from tests.deploy.test_kubernetes import K8S_VERSION, load


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_the_deployment_serves_grpc_and_probes_readiness_over_grpc():
    (container,) = load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    settings = Settings(**{k.removeprefix("BNFOLD_").lower(): v for k, v in env.items()})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port, "grpc": settings.grpc_port}
    probe = container["readinessProbe"]["grpc"]
    assert probe == {"port": settings.grpc_port, "service": "inference.GRPCInferenceService"}
    service_ports = {p["name"]: p for p in load("service.yaml")["spec"]["ports"]}
    assert service_ports["grpc"]["targetPort"] == "grpc"
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"


def test_the_grpc_inference_service_exposes_the_grpc_port_as_h2c():
    isvc = load("kserve-inferenceservice-grpc.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    (container,) = isvc["spec"]["predictor"]["containers"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
           "spec": {"containers": [container]}}  # fmt: skip
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    (port,) = container["ports"]
    assert port["name"] == "h2c"
    assert port["containerPort"] == int(env_of(container)["BNFOLD_GRPC_PORT"]) == 8001
