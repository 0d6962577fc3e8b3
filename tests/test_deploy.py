"""The deployment files under deploy/ against the code they run.

Every manifest parses as YAML; every ``diffserve`` command line in them (compose ``command``,
Kubernetes container ``command``, the Dockerfile's ``CMD``) parses with the real CLI parser
(``diffserve.api.cli.build_parser()``: sub-commands, flags, choices and required arguments); every
``DIFFSERVE_*`` name they mention is a field of ``diffserve.api.settings.Settings`` or a variable the code
reads by that name; the Redis configs carry the persistence that "no accepted job lost" rests
on; the KEDA triggers watch the demand sets the job store keeps; probes hit the ports the commands
listen on. Nothing is started: this is a check of names, not a deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
VARIABLE = re.compile(r"\bDIFFSERVE_[A-Z0-9_]+\b")
PERSISTENCE = {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_containers(doc: dict) -> list[dict]:
    spec = (doc.get("spec") or {})
    pod = ((spec.get("template") or {}).get("spec") or {}) or ((spec.get("jobTemplate") or {}).get("spec") or {})
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def diffserve_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv after "diffserve")`` for every diffserve command line in deploy/."""
    out = []
    for path in MANIFESTS:
        for doc in _docs(path):
            for name, svc in (doc.get("services") or {}).items():  # compose: the image's entrypoint is diffserve
                if "diffserve" in str(svc.get("image", "")) and svc.get("command"):
                    cmd = svc["command"]
                    out.append((f"{path.name}:{name}", shlex.split(cmd) if isinstance(cmd, str) else list(cmd)))
            for c in _k8s_containers(doc) if "kind" in doc else []:
                cmd = list(c.get("command") or []) + list(c.get("args") or [])
                if cmd and cmd[0] == "diffserve":
                    out.append((f"{path.name}:{doc['metadata']['name']}/{c['name']}", cmd[1:]))
    text = (DEPLOY / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("CMD "):
            out.append(("Dockerfile:CMD", json.loads(line[4:])))
    return out


def _redis_server_args(command: list[str]) -> list[str]:
    """The redis-server arguments of a container command, also when a shell starts it (to read the
    password from a secret file): ``["sh", "-c", "exec redis-server --appendonly yes ..."]``."""
    if command[:2] == ["sh", "-c"]:
        command = shlex.split(command[2])
        command = command[1:] if command[0] == "exec" else command
    assert command[0] == "redis-server", command
    return command


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_problems(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """What in ``argv`` the parser does not know: sub-commands, flags, then anything parse_args refuses."""
    if not argv or argv[0] not in _subparsers(parser):
        return [f"`diffserve` has no sub-command {argv[0] if argv else '(none)'}"]
    problems, current, path = [], parser, ["diffserve"]
    for token in argv:
        subs = _subparsers(current)
        if token.startswith("-"):
            flag = token.split("=", 1)[0]
            if flag not in current._option_string_actions:
                problems.append(f"`{' '.join(path)}` has no flag {flag}")
        elif token in subs:  # a leaf command has no sub-parsers, so its values are never taken for one
            current = subs[token]
            path.append(token)
    if not problems:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                parser.parse_args(argv)
            except SystemExit:
                problems.append(err.getvalue().strip().splitlines()[-1])
    return problems


def known_variables() -> tuple[set[str], str]:
    """Settings' fields as DIFFSERVE_* names, and the source text of every package (for the others)."""
    from diffserve.api.settings import Settings

    names = {"DIFFSERVE_" + name.upper() for name in Settings.model_fields}
    source = "\n".join(p.read_text() for pkg in ("engine", "triton_serving", "export", "api", "benchmarks")
                       for p in (ROOT / pkg).rglob("*.py"))
    return names, source


def variable_problems(text: str) -> list[str]:
    fields, source = known_variables()
    return sorted(f"{name} is neither a Settings field nor read by the code"
                  for name in set(VARIABLE.findall(text)) if name not in fields and f'"{name}"' not in source)


# -- the checks ------------------------------------------------------------------------------------------

def test_every_manifest_parses():
    assert {p.name for p in MANIFESTS} >= {"docker-compose.yml", "kustomization.yaml", "keda-scaledobject.yaml"}
    for path in MANIFESTS:
        docs = _docs(path)
        assert docs, path
        for doc in docs:
            assert isinstance(doc, dict), path
            if path.parent.name == "k8s":
                assert doc.get("apiVersion") and doc.get("kind"), path
    listed = set(_docs(DEPLOY / "k8s" / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_every_diffserve_command_and_flag_exists():
    from diffserve.api.cli import build_parser

    commands = diffserve_commands()
    used = {argv[0] for _, argv in commands} | {" ".join(argv[:3]) for _, argv in commands if argv[:2] == ["serve", "--role"]}
    assert {"serve --role api", "worker", "triton", "export"} <= used, used
    parser = build_parser()
    problems = [f"{where}: {p}" for where, argv in commands for p in command_problems(argv, parser)]
    assert not problems, "\n".join(problems)


def test_every_diffserve_variable_is_a_setting_or_read_by_the_code():
    text = "\n".join(p.read_text() for p in [*MANIFESTS, DEPLOY / "Dockerfile"])
    assert "DIFFSERVE_REDIS_URL" in text
    assert not variable_problems(text)


def test_redis_runs_with_the_persistence_that_keeps_accepted_jobs():
    compose = _docs(DEPLOY / "docker-compose.yml")[0]
    redis = compose["services"]["redis"]
    args = _redis_server_args(redis["command"])
    for key, value in PERSISTENCE.items():
        assert args[args.index(f"--{key}") + 1] == value, key
    assert any(v.endswith(":/data") for v in redis["volumes"]) and args[args.index("--dir") + 1] == "/data"
    assert redis["image"].startswith("redis:7")
    (config_doc,) = [d for d in _docs(DEPLOY / "k8s" / "configmap.yaml") if d["metadata"]["name"] == "diffserve-redis-config"]
    conf = dict(line.split(None, 1) for line in config_doc["data"]["redis.conf"].splitlines()
                if line.strip() and not line.lstrip().startswith("#"))
    assert all(conf[k] == v for k, v in PERSISTENCE.items()) and conf["dir"] == "/data"
    (sts,) = [d for d in _docs(DEPLOY / "k8s" / "redis.yaml") if d["kind"] == "StatefulSet"]
    (container,) = _k8s_containers(sts)
    assert container["image"].startswith("redis:7")
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_redis_requires_a_password_from_a_secret_and_admits_only_api_and_workers():
    # Compose: requirepass from the redis_password secret; Redis alone on an internal network with
    # the API replicas and workers, each of which reads the same secret file.
    compose = _docs(DEPLOY / "docker-compose.yml")[0]
    services = compose["services"]
    assert compose["secrets"]["redis_password"] == {"file": "./redis-password.txt"}
    assert "/deploy/redis-password.txt" in (ROOT / ".gitignore").read_text().splitlines()
    redis = services["redis"]
    args = _redis_server_args(redis["command"])
    assert args[args.index("--requirepass") + 1] == "$$(cat /run/secrets/redis_password)"
    assert redis["secrets"] == ["redis_password"] and redis["networks"] == ["store"]
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]
    assert compose["networks"]["store"]["internal"] is True
    on_store = {name for name, svc in services.items() if "store" in (svc.get("networks") or [])}
    roles = {name: (svc.get("command") or [None])[0] for name, svc in services.items()}
    assert on_store == {"redis"} | {n for n, r in roles.items() if r in ("worker", "serve")}
    assert {"api", "worker-1", "worker-2"} <= on_store and not {"triton-1", "export"} & on_store
    for name in on_store - {"redis"}:
        svc = services[name]
        assert "redis_password" in svc["secrets"], name
        assert svc["environment"]["DIFFSERVE_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password", name

    # Kubernetes: the diffserve-redis Secret (generated from a git-ignored file) is Redis's
    # requirepass, the API's and workers' password file and KEDA's credentials.
    kustomization = _docs(DEPLOY / "k8s" / "kustomization.yaml")[0]
    generated = {g["name"]: g for g in kustomization["secretGenerator"]}["diffserve-redis"]
    assert generated["files"] == ["password=redis-password.txt"]
    assert "/deploy/k8s/redis-password.txt" in (ROOT / ".gitignore").read_text().splitlines()
    docs = {(d["kind"], d["metadata"]["name"]): d for p in (DEPLOY / "k8s").glob("*.yaml") for d in _docs(p)
            if "metadata" in d}

    def secret_mounts(doc: dict, container: dict) -> set[str]:
        return _secret_mounts(doc, container, "diffserve-redis")

    sts = docs[("StatefulSet", "diffserve-redis")]
    (redis_container,) = _k8s_containers(sts)
    redis_args = _redis_server_args(redis_container["command"])
    assert redis_args[redis_args.index("--requirepass") + 1] == "$(cat /run/secrets/redis/password)"
    assert secret_mounts(sts, redis_container) == {"/run/secrets/redis"}
    assert "REDISCLI_AUTH" in redis_container["readinessProbe"]["exec"]["command"][2]
    password_file = docs[("ConfigMap", "diffserve-settings")]["data"]["DIFFSERVE_REDIS_PASSWORD_FILE"]
    for name, container in (("diffserve-api", "api"), ("diffserve-worker", "worker")):
        deployment = docs[("Deployment", name)]
        (c,) = [c for c in _k8s_containers(deployment) if c["name"] == container]
        assert str(Path(password_file).parent) in secret_mounts(deployment, c), name

    policy = docs[("NetworkPolicy", "diffserve-redis")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    peers = [(p.get("namespaceSelector"), p["podSelector"]["matchLabels"]) for p in rule["from"]]
    in_namespace = [labels for ns, labels in peers if ns is None]
    assert in_namespace == [{"app.kubernetes.io/name": "diffserve-api"}, {"app.kubernetes.io/name": "diffserve-worker"}]
    assert [ns for ns, _ in peers if ns is not None] == [{"matchLabels": {"kubernetes.io/metadata.name": "keda"}}]
    for name in ("diffserve-api", "diffserve-worker"):
        pod_labels = docs[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert {"app.kubernetes.io/name": name}.items() <= pod_labels.items()

    auth = docs[("TriggerAuthentication", "diffserve-redis")]["spec"]["secretTargetRef"]
    assert auth == [{"parameter": "password", "name": "diffserve-redis", "key": "password"}]
    for trigger in docs[("ScaledObject", "diffserve-worker")]["spec"]["triggers"]:
        assert trigger["authenticationRef"] == {"name": "diffserve-redis"}


def _secret_mounts(doc: dict, container: dict, secret: str) -> set[str]:
    volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"].get("volumes", [])}
    return {m["mountPath"] for m in container.get("volumeMounts", [])
            if (volumes.get(m["name"], {}).get("secret") or {}).get("secretName") == secret}


def test_webhook_secret_is_a_file_in_the_api_pods_only():
    # The API replicas vet a request's webhook and run the deliverer that signs it (it starts only
    # where a secret is configured); workers get no secret, so they neither need nor see it.
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    kustomization = _docs(DEPLOY / "k8s" / "kustomization.yaml")[0]
    generated = {g["name"]: g for g in kustomization["secretGenerator"]}["diffserve-webhook"]
    assert generated["files"] == ["secret=webhook-secret.txt"] and generated["options"]["disableNameSuffixHash"]
    assert "/deploy/k8s/webhook-secret.txt" in gitignore
    docs = {(d["kind"], d["metadata"]["name"]): d for p in (DEPLOY / "k8s").glob("*.yaml") for d in _docs(p)
            if "metadata" in d}
    assert "DIFFSERVE_WEBHOOK_SECRET_FILE" not in docs[("ConfigMap", "diffserve-settings")]["data"]
    api = docs[("Deployment", "diffserve-api")]
    (container,) = [c for c in _k8s_containers(api) if c["name"] == "api"]
    (path,) = [e["value"] for e in container.get("env", []) if e["name"] == "DIFFSERVE_WEBHOOK_SECRET_FILE"]
    assert _secret_mounts(api, container, "diffserve-webhook") == {str(Path(path).parent)}
    assert Path(path).name == "secret"  # the key the Secret is generated with
    worker = docs[("Deployment", "diffserve-worker")]
    for c in _k8s_containers(worker):
        assert not _secret_mounts(worker, c, "diffserve-webhook"), c["name"]
        assert all(e["name"] != "DIFFSERVE_WEBHOOK_SECRET_FILE" for e in c.get("env", [])), c["name"]

    compose = _docs(DEPLOY / "docker-compose.yml")[0]
    assert compose["secrets"]["webhook_secret"] == {"file": "./webhook-secret.txt"}
    assert "/deploy/webhook-secret.txt" in gitignore
    for name, svc in compose["services"].items():
        if name == "api":
            assert "webhook_secret" in svc["secrets"]
            assert svc["environment"]["DIFFSERVE_WEBHOOK_SECRET_FILE"] == "/run/secrets/webhook_secret"
            assert svc["environment"]["DIFFSERVE_REDIS_URL"]  # the shared settings are kept
        else:
            assert "webhook_secret" not in (svc.get("secrets") or []), name
            assert "DIFFSERVE_WEBHOOK_SECRET_FILE" not in (svc.get("environment") or {}), name


def test_keda_watches_every_slugs_demand_set():
    from diffserve.api.redis_jobs import RedisJobStore
    from diffserve.engine.catalog import CATALOG

    store = RedisJobStore("redis://127.0.0.1:1")  # no connection is made: only the key names are used
    (scaled,) = [d for d in _docs(DEPLOY / "k8s" / "keda-scaledobject.yaml") if d["kind"] == "ScaledObject"]
    assert scaled["kind"] == "ScaledObject" and scaled["spec"]["scaleTargetRef"]["name"] == "diffserve-worker"
    keys = []
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        # The `redis` scaler counts a set with SCARD: queued + running jobs at every priority.
        assert trigger["type"] == "redis" and meta["address"] == "diffserve-redis:6379"
        assert int(meta["listLength"]) >= 1
        keys.append(meta["listName"])
    assert sorted(keys) == sorted(store.demand_key(slug) for slug in CATALOG)


def test_probes_hit_the_ports_the_commands_listen_on():
    docs = {d["metadata"]["name"]: d for p in (DEPLOY / "k8s").glob("*.yaml") for d in _docs(p)
            if d.get("kind") in ("Deployment", "ConfigMap")}
    (api,) = _k8s_containers(docs["diffserve-api"])
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz" and api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = api["command"][api["command"].index("--port") + 1]
    assert {p["name"]: p["containerPort"] for p in api["ports"]}["http"] == int(port)
    workers = {c["name"]: c for c in _k8s_containers(docs["diffserve-worker"])}
    worker, triton = workers["worker"], workers["triton"]
    health = int(worker["command"][worker["command"].index("--health-port") + 1])
    assert {p["name"]: p["containerPort"] for p in worker["ports"]}["health"] == health
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    grpc = triton["command"][triton["command"].index("--grpc-port") + 1]
    assert worker["command"][worker["command"].index("--triton-url") + 1] == f"127.0.0.1:{grpc}"
    assert "nvidia.com/gpu" in triton["resources"]["limits"]
    assert docs["diffserve-settings"]["data"]["DIFFSERVE_REDIS_URL"].startswith("redis://diffserve-redis:6379")

    services = _docs(DEPLOY / "docker-compose.yml")[0]["services"]
    pairs = [(name, svc) for name, svc in services.items() if svc.get("command", [None])[0] == "worker"]
    assert len(pairs) >= 2 and services["api"]["deploy"]["replicas"]
    for name, svc in pairs:
        cmd = svc["command"]
        host, port = cmd[cmd.index("--triton-url") + 1].split(":")
        triton_cmd = services[host]["command"]
        assert triton_cmd[0] == "triton" and triton_cmd[triton_cmd.index("--grpc-port") + 1] == port, name
        assert str(cmd[cmd.index("--health-port") + 1]) + "/healthz" in " ".join(svc["healthcheck"]["test"]), name
        assert svc["depends_on"][host]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert len({svc["command"][svc["command"].index("--triton-url") + 1] for _, svc in pairs}) == len(pairs)


# -- the checkers themselves, on fragments that use only what the CLI has today ----------------------------------

FRAGMENT = """
services:
  api:
    image: diffserve:latest
    command: ["serve", "--host", "0.0.0.0", "--port", "8000", "--backend", "triton", "--triton-url", "triton:8001"]
    environment: {DIFFSERVE_MAX_QUEUED_JOBS: "10", DIFFSERVE_HOME: /models/home}
  triton:
    image: diffserve:latest
    command: ["triton", "--repository", "/models/repository", "--grpc-port", "8001"]
  bad:
    image: diffserve:latest
    command: ["serve", "--no-such-flag", "1"]
"""


def test_the_checkers_accept_todays_flags_and_name_what_is_missing(tmp_path):
    from diffserve.api.cli import build_parser

    parser = build_parser()
    services = yaml.safe_load(FRAGMENT)["services"]
    assert command_problems(services["api"]["command"], parser) == []
    assert command_problems(services["triton"]["command"], parser) == []
    assert command_problems(services["bad"]["command"], parser) == ["`diffserve serve` has no flag --no-such-flag"]
    assert command_problems(["bench", "capacity", "--arrival-rate", "1", "--gpus", "2"], parser) == []
    assert command_problems(["no-such-command"], parser) == ["`diffserve` has no sub-command no-such-command"]
    (refused,) = command_problems(["serve", "--backend", "gpu"], parser)  # a flag that exists, a value it refuses
    assert "invalid choice" in refused
    assert variable_problems(FRAGMENT) == []
    assert variable_problems("DIFFSERVE_NO_SUCH_SETTING: 1") == [
        "DIFFSERVE_NO_SUCH_SETTING is neither a Settings field nor read by the code"]
