"""Checks that stand in for the API server: CRD defaulting + CEL rules (cel-python), upstream schemas
(kubernetes-validate) and the restricted Pod Security Standard."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import celpy
import kubernetes_validate

# The Kubernetes versions Federator claims (README, docs/operator.md): oldest and newest.
K8S_VERSIONS = ("1.28.0", "1.37.0")


def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server stores: `default`s filled in, recursively, where a field is absent."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for prop, sub in (schema.get("properties") or {}).items():
            if prop not in out and "default" in sub:
                out[prop] = copy.deepcopy(sub["default"])
            if prop in out:
                out[prop] = apply_defaults(sub, out[prop])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            out = {k: apply_defaults(extra, v) if k not in (schema.get("properties") or {}) else v
                   for k, v in out.items()}
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


@cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_violations(schema: dict[str, Any], value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every x-kubernetes-validations rule that fails on `value`: (field path, message)."""
    if value is None:
        return []
    out: list[tuple[str, str]] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        try:
            ok = bool(_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)}))
        except celpy.CELEvalError:
            ok = False
        if not ok:
            out.append((path + rule.get("fieldPath", ""), rule["message"]))
    if isinstance(value, dict):
        for prop, sub in (schema.get("properties") or {}).items():
            if prop in value:
                out += cel_violations(sub, value[prop], f"{path}.{prop}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += cel_violations(schema["items"], item, f"{path}[{i}]")
    return out


def crd_violations(crd: dict[str, Any], manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """What `kubectl apply` would be refused with by the CRD's CEL rules (after defaulting)."""
    schema = crd_schema(crd)
    return cel_violations(schema, apply_defaults(schema, manifest))


def validate_upstream(manifest: dict[str, Any]) -> None:
    """kubernetes-validate --strict against every claimed version (raises on the first problem)."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


ALLOWED_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}


def restricted_problems(pod_spec: dict[str, Any]) -> list[str]:
    """Violations of the `restricted` Pod Security Standard (the checks kubelet admission makes)."""
    problems = []
    pod_sc = pod_spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(flag):
            problems.append(flag)
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {sorted(kinds)}")
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: allowPrivilegeEscalation")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            problems.append(f"{c['name']}: capabilities")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problems.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{c['name']}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{c['name']}: seccompProfile")
        if sc.get("privileged"):
            problems.append(f"{c['name']}: privileged")
        if not sc.get("readOnlyRootFilesystem"):  # not in the standard; Federator asks for it too
            problems.append(f"{c['name']}: readOnlyRootFilesystem")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{c['name']}: hostPort")
    return problems
