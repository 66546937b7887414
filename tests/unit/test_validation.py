"""services/intake/validation.py: check_submission turns bytes into an accepted JobSpec or a Rejection."""

from __future__ import annotations

import json

import pytest

from services.intake.validation import UNKNOWN_TENANT, Rejection, check_submission
from shared.contracts.catalog import Catalog
from shared.contracts.jobs import JobSpec

MAX = 64 * 1024


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def body(**fields) -> bytes:
    spec = {"tenant": "media-fr", "command": ["python", "train.py"]} | fields
    return json.dumps(spec).encode()


def reject(raw: bytes, catalog: Catalog, **kwargs) -> Rejection:
    with pytest.raises(Rejection) as info:
        check_submission(raw, catalog, max_bytes=kwargs.pop("max_bytes", MAX), **kwargs)
    return info.value


def locs(rejection: Rejection) -> list[list]:
    return [e.loc for e in rejection.errors]


def test_accepted_spec_gets_the_tenants_default_residency(catalog):
    spec = check_submission(body(), catalog, max_bytes=MAX)
    assert isinstance(spec, JobSpec)
    assert spec.tenant == "media-fr"
    assert spec.command == ["python", "train.py"]
    assert catalog.tenants["media-fr"].residency == "FR"
    assert spec.residency == "FR"


def test_an_eu_tenant_gets_eu_residency(catalog):
    assert check_submission(body(tenant="lumen-ai"), catalog, max_bytes=MAX).residency == "EU"


def test_an_explicit_residency_is_kept(catalog):
    assert check_submission(body(residency="any"), catalog, max_bytes=MAX).residency == "any"


def test_matching_subject_tenant_is_accepted(catalog):
    spec = check_submission(body(), catalog, max_bytes=MAX, subject_tenant="media-fr")
    assert spec.tenant == "media-fr"


def test_bad_json_is_rejected(catalog):
    rejection = reject(b'{"tenant": "media-fr", ', catalog)
    assert len(rejection.errors) == 1
    assert rejection.errors[0].loc == []
    assert "not valid JSON" in rejection.errors[0].msg
    assert rejection.tenant == UNKNOWN_TENANT


def test_bad_json_on_a_tenant_subject_is_charged_to_that_tenant(catalog):
    assert reject(b"nope", catalog, subject_tenant="media-fr").tenant == "media-fr"


@pytest.mark.parametrize(("raw", "kind"),
                         [(b"[1, 2]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType")])
def test_json_that_is_not_an_object_is_rejected(catalog, raw, kind):
    rejection = reject(raw, catalog)
    assert locs(rejection) == [[]]
    assert "JSON object" in rejection.errors[0].msg
    assert kind in rejection.errors[0].msg


def test_unknown_tenant_is_rejected(catalog):
    rejection = reject(body(tenant="ghost-corp"), catalog)
    assert locs(rejection) == [["tenant"]]
    assert "unknown tenant 'ghost-corp'" in rejection.errors[0].msg


def test_negative_gpus_are_rejected(catalog):
    rejection = reject(body(resources={"gpus": -1}), catalog)
    assert locs(rejection) == [["resources", "gpus"]]
    assert "greater than or equal to 0" in rejection.errors[0].msg
    assert rejection.tenant == "media-fr"


def test_missing_command_is_rejected(catalog):
    rejection = reject(json.dumps({"tenant": "media-fr"}).encode(), catalog)
    assert locs(rejection) == [["command"]]
    assert "required" in rejection.errors[0].msg.lower()


def test_unknown_field_is_rejected(catalog):
    rejection = reject(body(colour="blue"), catalog)
    assert locs(rejection) == [["colour"]]
    assert rejection.errors[0].msg == "unknown field"


def test_unknown_nested_field_is_rejected_with_its_path(catalog):
    rejection = reject(body(resources={"gpus": 1, "tpus": 2}), catalog)
    assert locs(rejection) == [["resources", "tpus"]]
    assert rejection.errors[0].msg == "unknown field"


def test_body_over_max_bytes_is_rejected_before_parsing(catalog):
    raw = body()
    rejection = reject(raw, catalog, max_bytes=len(raw) - 1)
    assert locs(rejection) == [[]]
    assert "too large" in rejection.errors[0].msg
    assert str(len(raw)) in rejection.errors[0].msg


def test_body_of_exactly_max_bytes_is_accepted(catalog):
    raw = body()
    assert check_submission(raw, catalog, max_bytes=len(raw)).tenant == "media-fr"


def test_tenant_mismatch_against_the_subject_is_rejected_as_the_submitters(catalog):
    rejection = reject(body(tenant="lumen-ai"), catalog, subject_tenant="media-fr")
    assert locs(rejection) == [["tenant"]]
    assert "is not the submitter" in rejection.errors[0].msg
    assert "'media-fr'" in rejection.errors[0].msg
    # the rejection is the submitter's event: the tenant its body names never hears of it
    assert rejection.tenant == "media-fr"


def test_a_submission_on_a_tenant_subject_may_leave_its_tenant_out(catalog):
    spec = check_submission(json.dumps({"command": ["x"]}).encode(), catalog, max_bytes=10_000,
                            subject_tenant="media-fr")
    assert spec.tenant == "media-fr"


def test_every_problem_is_reported(catalog):
    raw = json.dumps({"tenant": "ghost-corp", "resources": {"gpus": -2}, "colour": "blue"}).encode()
    rejection = reject(raw, catalog, subject_tenant="media-fr")
    found = locs(rejection)
    assert ["command"] in found
    assert ["resources", "gpus"] in found
    assert ["colour"] in found
    tenant_msgs = [e.msg for e in rejection.errors if e.loc == ["tenant"]]
    assert any("unknown tenant" in m for m in tenant_msgs)
    assert any("is not the submitter" in m for m in tenant_msgs)
    assert len(rejection.errors) == 5
    # the exception text names every problem too
    text = str(rejection)
    for part in ("command", "resources.gpus", "colour", "tenant"):
        assert part in text


def test_an_invalid_tenant_is_never_used_as_the_rejections_tenant(catalog):
    rejection = reject(body(tenant="Not A Tenant!"), catalog)
    assert rejection.tenant == UNKNOWN_TENANT


def test_a_tenant_with_a_trailing_newline_is_not_used_as_the_rejections_tenant(catalog):
    rejection = reject(body(tenant="media-fr\n"), catalog)
    assert rejection.tenant == UNKNOWN_TENANT


# --- steps and files (CONTRACT.md, "Steps and files") ---------------------------------------------------------

def problems(rejection: Rejection) -> list[str]:
    """Each error as the gateway would name it: `inputs.0.url: only file:// URLs are supported`."""
    return [f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in rejection.errors]


def test_steps_and_files_are_accepted_and_their_paths_kept_normalised(catalog):
    spec = check_submission(body(
        command=["sh", "job.sh"],
        steps=[{"command": ["sh", "job.sh"], "workdir": "/srv/c/w/", "stdout": "/srv/c//out.txt",
                "env": {"SNAKEMAKE": "1"}},
               {"command": ["gzip", "out.txt"], "ignore_error": True}],
        inputs=[{"path": "/srv/c/w/./job.sh", "content": "echo hi\n"},
                {"path": "/srv/c/w/data", "url": "file:///srv/shared/my%20data"}],
        outputs=[{"path": "/srv/c/out.txt", "url": "file://localhost/srv/results/out.txt"}]), catalog, max_bytes=MAX)
    assert [s.command for s in spec.steps] == [["sh", "job.sh"], ["gzip", "out.txt"]]
    assert (spec.steps[0].workdir, spec.steps[0].stdout, spec.inputs[0].path) == \
        ("/srv/c/w", "/srv/c/out.txt", "/srv/c/w/job.sh")
    assert spec.steps[1].ignore_error and not spec.steps[0].ignore_error
    assert ("inputs.1", "url", "/srv/shared/my data") in spec.staged_paths()
    assert ("outputs.0", "url", "/srv/results/out.txt") in spec.staged_paths()


def test_a_job_without_steps_or_files_reads_as_it_always_did():
    spec = JobSpec(tenant="media-fr", command=["x"])
    assert spec.steps == [] and spec.inputs == [] and spec.outputs == [] and spec.staged_paths() == []
    # left out of the JSON: an agent of an earlier version, which forbids unknown fields, still takes the job
    assert not {"steps", "inputs", "outputs"} & set(json.loads(spec.model_dump_json()))


@pytest.mark.parametrize(("files", "said"), [
    ({"inputs": [{"path": "/srv/in", "url": "https://example.org/in"}]},
     "inputs.0.url: only file:// URLs are supported"),
    ({"inputs": [{"path": "/srv/in", "url": "s3://bucket/in"}]}, "inputs.0.url: only file:// URLs are supported"),
    ({"outputs": [{"path": "/srv/out", "url": "gs://bucket/out"}]},
     "outputs.0.url: only file:// URLs are supported"),
    ({"outputs": [{"path": "/srv/out", "url": "file://other-host/srv/out"}]},
     "outputs.0.url: a file:// URL names a path on the site: file:///absolute/path"),
    ({"inputs": [{"path": "/srv/in", "url": "file://srv/in"}]},
     "inputs.0.url: a file:// URL names a path on the site: file:///absolute/path"),
    ({"inputs": [{"path": "/srv/in", "url": "file:///srv/%2e%2e/etc/passwd"}]},
     "inputs.0.url: the path of a file:// URL must not contain '..'"),
    ({"inputs": [{"path": "in.txt", "content": "x"}]}, "inputs.0.path: must be an absolute path"),
    ({"inputs": [{"path": "/srv/c/../../root/.ssh/authorized_keys", "content": "x"}]},
     "inputs.0.path: must not contain '..'"),
    ({"inputs": [{"path": "/srv/in"}]}, "inputs.0: needs exactly one of content or url"),
    ({"inputs": [{"path": "/srv/in", "content": "x", "url": "file:///srv/x"}]},
     "inputs.0: needs exactly one of content or url"),
    ({"outputs": [{"path": "/srv/out"}]}, "outputs.0.url: Field required"),
    ({"steps": [{"command": ["x"], "stdout": "out.txt"}]}, "steps.0.stdout: must be an absolute path"),
    ({"steps": [{"command": ["x"], "workdir": "/srv/../etc"}]}, "steps.0.workdir: must not contain '..'"),
    ({"steps": [{"command": ["x"], "env": {"A": "nul\u0000"}}]},
     "steps.0.env.A: String should match pattern '^[^\\x00]*$'"),
])
def test_a_file_the_contract_cannot_stage_is_rejected_naming_its_field(catalog, files, said):
    assert problems(reject(body(command=["x"], **files), catalog)) == [said]


def test_the_first_step_must_be_the_jobs_command(catalog):
    rejection = reject(body(command=["sh", "job.sh"], steps=[{"command": ["sh", "other.sh"]}]), catalog)
    assert problems(rejection) == ["steps.0.command: must be the job's command"]
    # the later steps run what they like
    spec = check_submission(body(command=["a"], steps=[{"command": ["a"]}, {"command": ["b"]}]), catalog,
                            max_bytes=MAX)
    assert spec.command == ["a"] and len(spec.steps) == 2


def test_steps_and_files_are_bounded(catalog):
    assert locs(reject(body(command=["a"], steps=[{"command": ["a"]}] * 33), catalog, max_bytes=10**6)) == [["steps"]]
    many = [{"path": f"/srv/{i}", "content": ""} for i in range(257)]
    assert locs(reject(body(inputs=many), catalog, max_bytes=10**6)) == [["inputs"]]
