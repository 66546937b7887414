"""shared/contracts/catalog.py: the catalog files load, and a bad one says where and what is wrong."""

from __future__ import annotations

import pytest
import yaml

from shared.contracts.catalog import Catalog, CatalogError

GOOD_SITE = {"id": "site-a", "kind": "private_cloud", "country": "FR", "jurisdiction": "EU", "carbon_zone": "FR",
             "gpus": {"H100": 4}}
GOOD_TENANT = {"id": "acme", "residency": "EU"}


def write(tmp_path, name: str, content: dict):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return path


def sites_file(tmp_path, *entries: dict):
    return write(tmp_path, "sites.yaml", {"sites": list(entries)})


def load_error(**files) -> str:
    with pytest.raises(CatalogError) as info:
        Catalog.load(**files)
    return str(info.value)


def test_the_built_in_catalog_loads():
    catalog = Catalog.load()
    assert len(catalog.sites) == 7
    assert len(catalog.tenants) == 3
    assert set(catalog.tenants) == {"cnrs-lab", "lumen-ai", "media-fr"}
    assert catalog.site("jean-zay").public
    assert catalog.sites["scw-par"].price("H100") == 2.87
    assert all(site_id == entry.id for site_id, entry in catalog.sites.items())


def test_catalog_files_load(tmp_path):
    second = GOOD_SITE | {"id": "site-b", "kind": "public_hpc", "gpus": {"A100": 8}}
    catalog = Catalog.load(sites_file(tmp_path, GOOD_SITE, second),
                           write(tmp_path, "tenants.yaml", {"tenants": [GOOD_TENANT]}))
    assert list(catalog.sites) == ["site-a", "site-b"]
    assert list(catalog.tenants) == ["acme"]
    assert catalog.sites["site-a"].pue == 1.2  # defaults apply


def test_an_unknown_key_names_the_file_the_entry_and_the_key(tmp_path):
    path = sites_file(tmp_path, GOOD_SITE, GOOD_SITE | {"id": "site-b", "colour": "blue"})
    message = load_error(sites_file=path)
    assert message == f"{path}: entry 2 (site-b): colour: unknown key"


def test_a_bad_value_names_the_file_the_entry_and_the_field(tmp_path):
    path = sites_file(tmp_path, GOOD_SITE | {"pue": 9})
    message = load_error(sites_file=path)
    assert message.startswith(f"{path}: entry 1 (site-a): pue: ")
    assert "less than or equal to 3" in message


def test_a_bad_value_inside_a_mapping_names_its_path(tmp_path):
    path = sites_file(tmp_path, GOOD_SITE, GOOD_SITE | {"id": "site-b", "gpus": {"H100": -1}})
    message = load_error(sites_file=path)
    assert message.startswith(f"{path}: entry 2 (site-b): gpus.H100: ")
    assert "greater than or equal to 0" in message


def test_a_duplicate_id_names_the_file_the_entry_and_the_problem(tmp_path):
    path = sites_file(tmp_path, GOOD_SITE, GOOD_SITE | {"id": "site-b"}, GOOD_SITE)
    message = load_error(sites_file=path)
    assert message == f"{path}: entry 3 (site-a): duplicate id in sites"


def test_a_duplicate_tenant_is_refused_too(tmp_path):
    path = write(tmp_path, "tenants.yaml", {"tenants": [GOOD_TENANT, GOOD_TENANT]})
    assert load_error(tenants_file=path) == f"{path}: entry 2 (acme): duplicate id in tenants"


def test_a_whole_entry_problem_names_the_entry(tmp_path):
    no_carbon = {k: v for k, v in GOOD_SITE.items() if k != "carbon_zone"}
    path = sites_file(tmp_path, no_carbon)
    message = load_error(sites_file=path)
    assert message.startswith(f"{path}: entry 1 (site-a): ")
    assert "needs carbon_zone or carbon_g_per_kwh" in message


def test_every_problem_is_reported_on_its_own_line(tmp_path):
    path = sites_file(tmp_path, GOOD_SITE | {"pue": 9}, GOOD_SITE | {"id": "site-b", "colour": "blue"})
    lines = load_error(sites_file=path).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: entry 1 (site-a): pue: ")
    assert lines[1] == f"{path}: entry 2 (site-b): colour: unknown key"


def test_a_tenant_file_problem_names_the_tenant(tmp_path):
    path = write(tmp_path, "tenants.yaml", {"tenants": [GOOD_TENANT | {"residency": "europe"}]})
    assert load_error(tenants_file=path).startswith(f"{path}: entry 1 (acme): residency: ")


def test_a_top_level_unknown_key_names_the_file(tmp_path):
    path = write(tmp_path, "sites.yaml", {"sites": [GOOD_SITE], "extra": 1})
    assert load_error(sites_file=path) == f"{path}: file: extra: unknown key"


def test_a_missing_file_is_a_catalog_error(tmp_path):
    path = tmp_path / "missing.yaml"
    message = load_error(sites_file=path)
    assert message.startswith(f"{path}: cannot read")


def test_invalid_yaml_is_a_catalog_error(tmp_path):
    path = tmp_path / "sites.yaml"
    path.write_text("sites: [unclosed\n")
    assert load_error(sites_file=path).startswith(f"{path}: not valid YAML")


def test_slurm_options_give_a_sites_defaults_limits_and_names(tmp_path):
    slurm = {"partition": "gpu_p5", "account": "abc@h100", "qos": "qos_gpu_h100-t3", "mem_per_gpu_gb": 40,
             "cpus_per_gpu": 24, "gres_type_map": {"H100": ""}, "max_mem_per_node_gb": 512, "max_nodes": 16}
    catalog = Catalog.load(sites_file(tmp_path, GOOD_SITE | {"backend": "slurm", "slurm": slurm}))
    options = catalog.sites["site-a"].slurm
    assert (options.qos, options.gres_type("H100"), options.max_nodes) == ("qos_gpu_h100-t3", "", 16)


def test_slurm_options_must_fit_the_site(tmp_path):
    path = sites_file(tmp_path, GOOD_SITE | {"slurm": {"partition": "gpu"}})
    assert "slurm options on a site whose backend is simulated" in load_error(sites_file=path)
    path = sites_file(tmp_path, GOOD_SITE | {"backend": "slurm", "slurm": {"gres_type_map": {"A100": "a100"}}})
    assert "slurm.gres_type_map names GPU types the site does not offer: ['A100']" in load_error(sites_file=path)
    path = sites_file(tmp_path, GOOD_SITE | {"backend": "slurm", "slurm": {"mem_per_gpu_gb": 0}})
    assert load_error(sites_file=path).startswith(f"{path}: entry 1 (site-a): slurm.mem_per_gpu_gb: ")


def test_a_gpu_type_the_catalog_does_not_know_is_named_in_the_error(tmp_path):
    path = sites_file(tmp_path, GOOD_SITE | {"gpus": {"H100": 8, "B200": 8}})
    error = load_error(sites_file=path)
    assert error.startswith(f"{path}: entry 1 (site-a): gpus.B200")
    assert "unknown GPU type 'B200': one of H100, A100, L40S, L4" in error


def test_a_local_or_slurm_site_may_give_a_files_root_kept_normalised(tmp_path):
    catalog = Catalog.load(sites_file(tmp_path, GOOD_SITE | {"backend": "local", "files_root": "/srv/continuum/"},
                                      GOOD_SITE | {"id": "site-b", "backend": "slurm", "files_root": "/scratch/c"},
                                      GOOD_SITE | {"id": "site-c", "backend": "local"}))
    assert catalog.sites["site-a"].files_root == "/srv/continuum"
    assert catalog.sites["site-b"].files_root == "/scratch/c"
    assert catalog.sites["site-c"].files_root is None  # it stages no files


@pytest.mark.parametrize(("entry", "said"), [
    ({"files_root": "/srv/continuum"}, "files_root on a site whose backend is simulated: only local and slurm"),
    ({"backend": "local", "files_root": "srv/continuum"}, "files_root: must be an absolute path"),
    ({"backend": "local", "files_root": "/srv/continuum/../.."}, "files_root: must not contain '..'"),
])
def test_a_files_root_must_be_an_absolute_directory_of_a_local_or_slurm_site(tmp_path, entry, said):
    assert said in load_error(sites_file=sites_file(tmp_path, GOOD_SITE | entry))
