"""Deployment files, checked without Docker: compose, Dockerfile, install script, dashboard, README."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.settings import TABLE_END, TABLE_START, Settings, markdown_table

REPO = Path(__file__).resolve().parents[2]
COMPOSE = ("docker-compose.yml", "docker-compose.gpu.yml")


def compose(name: str) -> dict:
    """A compose file, parsed."""
    return yaml.safe_load((REPO / name).read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages() -> dict[str, list[tuple[str, str]]]:
    """The Dockerfile's instructions by stage name."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for op, args in dockerfile_instructions():
        if op == "FROM":
            current = args.split()[-1]
            out[current] = []
        elif current is not None:
            out[current].append((op, args))
    return out


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching pattern wins)."""
    ignored = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/")) for p in prefixes
        ):
            ignored = not negate
    return ignored


# -- compose -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPOSE)
def test_compose_files_parse_and_reference_files_that_exist(name):
    services = compose(name)["services"]
    for service in services.values():
        build = service.get("build")
        if isinstance(build, dict) and "context" in build:
            assert (REPO / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), source
            else:
                assert source in compose("docker-compose.yml")["volumes"], source


def test_compose_stack_is_pinned_private_and_gpu_override_extends_it():
    base = compose("docker-compose.yml")
    default = {name for name, service in base["services"].items() if "profiles" not in service}
    assert default == {"adapterserve", "prometheus", "grafana"}
    for service in base["services"].values():
        tag = service["image"].rsplit(":", 1)
        assert len(tag) == 2 and tag[1] not in ("", "latest"), service["image"]
        # published on the host's loopback only
        assert all(port.startswith("127.0.0.1:") for port in service.get("ports", []))
    assert base["services"]["adapterserve"]["build"]["args"]["TORCH_VARIANT"] == "cpu"
    gpu = compose("docker-compose.gpu.yml")["services"]
    assert set(gpu) <= set(base["services"])
    app = gpu["adapterserve"]
    assert app["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert app["environment"]["ADAPTERSERVE_DTYPE"] == "bfloat16"
    assert app["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # every compose environment variable is a real setting (or the NVIDIA runtime's)
    settings = {f"ADAPTERSERVE_{name.upper()}" for name in Settings.model_fields}
    for service in (base["services"]["adapterserve"], app):
        assert {k for k in service["environment"] if k.startswith("ADAPTERSERVE_")} <= settings


def test_ray_profile_runs_two_replicas_over_the_s3_server_it_starts():
    from service.ray_app import RaySettings

    services = compose("docker-compose.yml")["services"]
    ray = {name for name, service in services.items() if "ray" in service.get("profiles", [])}
    assert ray == {"s3", "s3-bucket", "adapterserve-ray"}
    app = services["adapterserve-ray"]
    assert app["build"]["args"]["INSTALL_EXTRAS"] == "ray"
    assert app["command"][:3] == ["serve", "--ray", "--replicas"] and "2" in app["command"][3]
    env = app["environment"]
    bucket = env["ADAPTERSERVE_STORE"].removeprefix("s3://").split("/")[0]
    assert env["ADAPTERSERVE_STORE"].startswith("s3://") and env["AWS_ENDPOINT_URL"] == "http://s3:9000"
    # the bucket the store names is the one the init job makes, and the app waits for it
    assert f"s3/{bucket}" in " ".join(services["s3-bucket"]["entrypoint"])
    assert app["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully"
    assert services["s3-bucket"]["depends_on"]["s3"]["condition"] == "service_healthy"
    known = {f"ADAPTERSERVE_{n.upper()}" for n in Settings.model_fields}
    known |= {f"ADAPTERSERVE_RAY_{n.upper()}" for n in RaySettings.model_fields}
    assert {k for k in env if k.startswith("ADAPTERSERVE_")} <= known


def test_grafana_provisioning_points_at_the_dashboard_and_the_datasource():
    grafana = compose("docker-compose.yml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    provisioning = REPO / next(src for src, dst in mounts.items() if dst == "/etc/grafana/provisioning")
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "adapterserve.yml").read_text())["providers"]
    dashboards = REPO / next(src for src, dst in mounts.items() if dst == provider["options"]["path"])
    (dashboard_file,) = dashboards.glob("*.json")
    panels = json.loads(dashboard_file.read_text())["panels"]
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"] and panel["targets"], panel["title"]


def test_dashboard_json_is_the_generators_output():
    sys.path.insert(0, str(REPO / "deploy" / "grafana"))
    try:
        import make_dashboard
    finally:
        sys.path.pop(0)
    assert make_dashboard.OUT.read_text() == make_dashboard.render(), (
        "run `python deploy/grafana/make_dashboard.py`"
    )


# -- Dockerfile and the install script -----------------------------------------------------------------


def test_the_image_installs_with_the_script_ci_runs():
    build, runtime = stages()["build"], stages()["runtime"]
    runs = [shlex.split(args.replace("&&", " && ")) for op, args in build if op == "RUN"]
    invocations = [cmd[cmd.index("scripts/install.sh") :] for cmd in runs if "scripts/install.sh" in cmd]
    # torch first in a layer of its own, then the whole install: both into the venv the runtime copies
    assert invocations == [
        ["scripts/install.sh", "/opt/venv", "--torch-only"],
        [
            "scripts/install.sh",
            "/opt/venv",
            "--extras=${INSTALL_EXTRAS}",
            "&&",
            "scripts/slim-venv.sh",
            "/opt/venv",
        ],
    ]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    # the runtime gets no test extra, nothing editable, and installs nothing itself
    assert not any(op == "RUN" and ("pip" in args or "install.sh" in args) for op, args in runtime)
    makefile = (REPO / "Makefile").read_text()
    install = re.search(r"^install:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "scripts/install.sh $(VENV) --test --editable" in install
    assert "make install" in (REPO / ".ci" / "run").read_text()


def test_runtime_stage_is_slim_non_root_healthchecked_and_configured_by_environment():
    runtime = stages()["runtime"]
    ops = dict(runtime)
    assert re.fullmatch(r"[a-z]+:[a-z]+", ops["USER"]) and not ops["USER"].startswith("root")
    assert "/livez" in ops["HEALTHCHECK"] and '["/data"]' in ops["VOLUME"]
    env = " ".join(args for op, args in runtime if op == "ENV")
    assert "ADAPTERSERVE_HOST=0.0.0.0" in env and "ADAPTERSERVE_STORE=/data/store" in env
    text = (REPO / "Dockerfile").read_text()
    image = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image)
    assert not re.search(r"apt-get install|build-essential|gcc", text)


def test_every_copied_path_exists_and_is_in_the_build_context():
    copies = [args for op, args in dockerfile_instructions() if op == "COPY" and "--from" not in args]
    sources = [s for args in copies for s in args.split()[:-1]]
    assert "scripts/install.sh" in sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not dockerignored(source), source
        for file in (REPO / source).rglob("*.py") if (REPO / source).is_dir() else []:
            assert not dockerignored(str(file.relative_to(REPO))), file
    assert dockerignored(".venv/bin/python") and dockerignored("tests/unit/test_deploy.py")
    assert dockerignored("service/__pycache__/app.cpython-311.pyc")


def test_image_seeds_the_demo_tasks_it_copies():
    """The image starts like `make serve`: its seed directory is the copied examples/, every file in the context."""
    runtime = stages()["runtime"]
    env = " ".join(args for op, args in runtime if op == "ENV")
    seed = re.search(r"ADAPTERSERVE_SEED_DIR=(\S+)", env).group(1)
    copies = [args.split() for op, args in runtime if op == "COPY" and "--from" not in args]
    assert ["examples", seed] in copies
    files = [f for f in (REPO / "examples").rglob("*") if f.is_file()]
    assert any(f.name == "adapter_config.json" for f in files)
    for file in files:
        assert not dockerignored(str(file.relative_to(REPO))), file


def test_install_script_pins_the_torch_of_pyproject():
    script = (REPO / "scripts" / "install.sh").read_text()
    pinned = re.search(r"^TORCH_VERSION=(\S+)", script, re.M).group(1)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={pinned}" in deps
    assert (REPO / "scripts" / "install.sh").stat().st_mode & 0o111


# -- README ----------------------------------------------------------------------------------------------


def test_readme_settings_table_is_generated_from_the_settings_class():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index(TABLE_START) + len(TABLE_START) : readme.index(TABLE_END)].strip("\n") + "\n"
    assert table == markdown_table(), "run `python -m service.settings --update README.md`"
    rows = table.splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)
    assert all(field.description for field in Settings.model_fields.values())
