"""services/routing/policy.py: place() and permanent_reasons() on small hand-built catalogs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.routing.policy import (
    AVOID_S,
    MAX_ATTEMPTS,
    MAX_TRANSIENT_REFUSALS,
    NO_GPU,
    TRANSIENT_BACKOFF_S,
    Hold,
    Holding,
    SiteView,
    TenantBudget,
    departures,
    permanent_reasons,
    place,
)
from shared.contracts.catalog import Catalog, SiteEntry, SlurmOptions, TenantEntry
from shared.contracts.jobs import HistoryEntry, JobSpec, JobState, Resources


def site(id: str, kind: str = "private_cloud", country: str = "FR", jurisdiction: str = "EU",
         certifications: tuple[str, ...] = (), gpus: dict[str, int] | None = None, **extra) -> SiteEntry:
    return SiteEntry(id=id, kind=kind, country=country, jurisdiction=jurisdiction, carbon_g_per_kwh=50.0,
                     certifications=list(certifications), gpus=gpus if gpus is not None else {"H100": 8}, **extra)


def tenant(allocation: float = 0.0, overflow: str = "allowed", residency: str = "EU") -> TenantEntry:
    return TenantEntry(id="acme", allocation_gpu_hours=allocation, overflow=overflow, residency=residency,
                       monthly_budget_eur=1000)


def job(gpus: int = 1, gpu_type: str = "any", nodes: int = 1, **fields) -> JobSpec:
    return JobSpec(tenant="acme", command=["run"], resources=Resources(gpus=gpus, gpu_type=gpu_type, nodes=nodes),
                   **fields)


def view(entry: SiteEntry, up: bool = True, free: dict[str, int] | None = None) -> SiteView:
    return SiteView(entry=entry, up=up, free=dict(entry.gpus) if free is None else free)


def candidate(decision, site_id):
    (found,) = [c for c in decision.candidates if c.site == site_id]
    return found


# --- residency -----------------------------------------------------------------------------------------------

def test_residency_fr_never_picks_a_non_fr_site():
    fr = site("fr-small", country="FR", gpus={"H100": 2})
    nl = site("nl-big", country="NL", gpus={"H100": 8})
    decision = place(job(residency="FR"), tenant(), [view(nl), view(fr)])
    assert decision.site == "fr-small"
    assert candidate(decision, "nl-big").reasons == ["residency FR: site is in NL"]
    assert not candidate(decision, "nl-big").eligible


def test_a_site_that_never_could_run_the_job_is_still_explained_with_its_parts():
    # choose() leaves such a site out of the work; the written decision still prices it, as one that could
    fr = site("fr", country="FR", price_eur_per_gpu_hour={"H100": 2.0})
    nl = site("nl", country="NL", price_eur_per_gpu_hour={"H100": 3.0})
    spec = job(gpus=2, residency="FR", walltime_s=1800)
    busy_nl = SiteView(entry=nl, up=True, free={"H100": 0}, carbon_g_per_kwh=50.0)
    decision = place(spec, tenant(), [busy_nl, view(fr)])
    assert candidate(decision, "nl").parts == {"wait_s": -1.0, "run_s": 1800.0, "cost_eur": 3.0,
                                               "co2e_kg": round(0.7 * 2 * 0.5 * 1.2 * 50 / 1000, 4)}
    assert candidate(decision, "fr").parts["cost_eur"] == 2.0


def test_residency_fr_with_only_non_fr_sites_is_impossible():
    decision = place(job(residency="FR"), tenant(), [view(site("nl", country="NL")), view(site("de", country="DE"))])
    assert decision.site is None
    assert decision.impossible is True


def test_residency_defaults_to_the_tenants():
    fr = site("fr", country="FR", gpus={"H100": 1})
    nl = site("nl", country="NL", gpus={"H100": 8})
    decision = place(job(), tenant(residency="FR"), [view(fr), view(nl)])
    assert decision.site == "fr"
    assert permanent_reasons(job(), tenant(residency="FR"), nl) == ["residency FR: site is in NL"]


def test_eu_residency_excludes_a_non_eu_jurisdiction_even_inside_the_eu():
    eu = site("eu", gpus={"H100": 1})
    us_in_fr = site("us-in-fr", country="FR", jurisdiction="US", gpus={"H100": 8})
    decision = place(job(residency="EU"), tenant(), [view(eu), view(us_in_fr)])
    assert decision.site == "eu"
    assert candidate(decision, "us-in-fr").reasons == ["residency EU: site's jurisdiction is US"]


def test_residency_any_allows_a_non_eu_jurisdiction():
    us = site("us", country="US", jurisdiction="US")
    assert permanent_reasons(job(residency="any"), tenant(), us) == []
    assert place(job(residency="any"), tenant(), [view(us)]).site == "us"


# --- certifications, GPU type and count -------------------------------------------------------------------------

def test_certifications_are_honoured():
    plain = site("plain", certifications=("iso27001",), gpus={"H100": 8})
    hds = site("hds", certifications=("hds", "iso27001"), gpus={"H100": 2})
    decision = place(job(certifications=["hds"]), tenant(), [view(plain), view(hds)])
    assert decision.site == "hds"
    assert candidate(decision, "plain").reasons == ["lacks certification hds"]


def test_every_missing_certification_is_named():
    reasons = permanent_reasons(job(certifications=["secnumcloud", "hds"]), tenant(), site("x"))
    assert reasons == ["lacks certification hds, secnumcloud"]


def test_gpu_type_is_honoured():
    h100 = site("h100-only", gpus={"H100": 8})
    a100 = site("a100", gpus={"A100": 2})
    decision = place(job(gpu_type="A100"), tenant(), [view(h100), view(a100)])
    assert decision.site == "a100"
    assert decision.gpu_type == "A100"
    assert candidate(decision, "h100-only").reasons == ["offers no A100 GPUs"]


def test_gpu_count_beyond_the_site_total_is_a_permanent_reason():
    assert permanent_reasons(job(gpus=16, gpu_type="H100"), tenant(), site("s", gpus={"H100": 8})) == [
        "needs 16 H100 GPUs, has 8"]


def test_gpus_are_counted_per_node():
    s = site("s", gpus={"H100": 8})
    assert permanent_reasons(job(gpus=4, nodes=2), tenant(), s) == []
    assert permanent_reasons(job(gpus=4, nodes=3), tenant(), s) == ["needs 12 any GPUs, has 8"]


def test_any_gpu_type_takes_the_type_with_most_free():
    s = site("s", gpus={"H100": 8, "L40S": 8})
    decision = place(job(gpus=2), tenant(), [view(s, free={"H100": 3, "L40S": 6})])
    assert decision.gpu_type == "L40S"


def test_a_job_without_gpus_gets_no_gpu_type():
    decision = place(job(gpus=0), tenant(), [view(site("s"), free={"H100": 0})])
    assert decision.site == "s"
    assert decision.gpu_type == NO_GPU


# --- overflow and allocations ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["private_cloud", "partner"])
def test_overflow_forbidden_by_the_job_excludes_paid_sites(kind):
    public = site("public", kind="public_hpc", gpus={"H100": 1})
    paid = site("paid", kind=kind, gpus={"H100": 8})
    decision = place(job(overflow="forbidden"), tenant(allocation=100), [view(public), view(paid)])
    assert decision.site == "public"
    assert candidate(decision, "paid").reasons == ["overflow forbidden by the job: site is paid capacity"]


def test_overflow_forbidden_by_the_tenant_excludes_paid_sites():
    paid = site("paid", gpus={"H100": 8})
    decision = place(job(), tenant(allocation=100, overflow="forbidden"), [view(paid)])
    assert decision.site is None
    assert decision.impossible is True
    assert candidate(decision, "paid").reasons == ["overflow forbidden by the tenant: site is paid capacity"]


def test_a_tenant_without_allocation_cannot_use_public_sites():
    public = site("public", kind="public_hpc", gpus={"H100": 16})
    paid = site("paid", gpus={"H100": 1})
    decision = place(job(), tenant(allocation=0), [view(public), view(paid)])
    assert decision.site == "paid"
    assert decision.overflow is False  # no public hours to overflow from
    assert candidate(decision, "public").reasons == ["tenant has no public allocation"]


def test_a_tenant_with_allocation_prefers_the_public_site_when_it_fits():
    public = site("public", kind="public_hpc", gpus={"H100": 2})
    paid = site("paid", gpus={"H100": 8})
    decision = place(job(), tenant(allocation=100), [view(public), view(paid)])
    assert decision.site == "public"
    assert decision.overflow is False
    # paid was possible, public comes first
    assert candidate(decision, "paid").reasons == ["public capacity first: public can run it now"]


def test_a_tenant_with_allocation_overflows_to_paid_when_public_is_full():
    public = site("public", kind="public_hpc", gpus={"H100": 2})
    paid = site("paid", gpus={"H100": 8})
    decision = place(job(gpus=2), tenant(allocation=100), [view(public, free={"H100": 1}), view(paid)])
    assert decision.site == "paid"
    assert decision.overflow is True


# --- impossible, waiting, candidates ----------------------------------------------------------------------------

def test_a_job_no_site_could_ever_run_is_impossible():
    sites = [view(site("a", gpus={"H100": 8})), view(site("b", gpus={"L4": 8}))]
    decision = place(job(gpus=64), tenant(), sites)
    assert decision.site is None
    assert decision.impossible is True
    assert all(c.reasons for c in decision.candidates)


def test_a_site_that_is_down_makes_the_job_wait():
    decision = place(job(), tenant(), [view(site("s"), up=False)])
    assert decision.site is None
    assert decision.impossible is False
    assert decision.reasons == ["s: site is down or has not reported"]


def test_a_full_site_makes_the_job_wait():
    decision = place(job(gpus=4, gpu_type="H100"), tenant(), [view(site("s"), free={"H100": 3})])
    assert decision.site is None
    assert decision.impossible is False
    assert decision.reasons == ["s: needs 4 H100 GPUs now, 3 free"]


def test_wait_when_some_site_could_run_it_later_even_if_others_never_can():
    never = site("never", country="NL", gpus={"H100": 8})
    later = site("later", gpus={"H100": 8})
    decision = place(job(residency="FR"), tenant(), [view(never), view(later, up=False)])
    assert decision.site is None
    assert decision.impossible is False
    assert len(decision.reasons) == 2


def test_no_sites_at_all_is_not_called_impossible():
    decision = place(job(), tenant(), [])
    assert decision.site is None
    assert decision.impossible is False
    assert decision.candidates == []


def test_every_catalog_site_appears_once_in_candidates():
    catalog = Catalog.load()
    views = [view(entry) for entry in catalog.sites.values()]
    decision = place(job(gpus=1, residency="FR"), catalog.tenants["cnrs-lab"], views)
    ids = [c.site for c in decision.candidates]
    assert sorted(ids) == sorted(catalog.sites)
    assert len(ids) == len(set(ids)) == 7
    assert ids == sorted(ids)
    # cnrs-lab has an allocation: the public supercomputer in France wins
    assert decision.site == "jean-zay"
    assert decision.overflow is False


def test_eligible_candidates_carry_a_score_and_cost_parts():
    paid = site("paid", gpus={"H100": 8}, price_eur_per_gpu_hour={"H100": 2.0})
    decision = place(job(gpus=2, walltime_s=1800), tenant(), [view(paid, free={"H100": 5})])
    c = candidate(decision, "paid")
    assert c.eligible and c.reasons == []
    assert 0.0 <= c.score <= 1.0
    assert c.parts["cost_eur"] == pytest.approx(2.0 * 2 * 0.5)


def test_ties_are_broken_by_site_id_whatever_the_input_order():
    a, b, c = site("alpha"), site("bravo"), site("charlie")
    orders = [[a, b, c], [c, b, a], [b, c, a]]
    assert {place(job(), tenant(), [view(s) for s in order]).site for order in orders} == {"alpha"}


def test_the_cost_objective_picks_the_cheapest_and_carbon_the_cleanest():
    cheap = site("cheap", price_eur_per_gpu_hour={"H100": 2.0})
    clean = site("clean", price_eur_per_gpu_hour={"H100": 3.0})
    views = [SiteView(entry=cheap, up=True, free={"H100": 8}, carbon_g_per_kwh=800.0),
             SiteView(entry=clean, up=True, free={"H100": 8}, carbon_g_per_kwh=25.0)]
    assert place(job(objective="cost"), tenant(), views).site == "cheap"
    assert place(job(objective="carbon"), tenant(), views).site == "clean"
    by_cost = place(job(objective="cost"), tenant(), views)
    assert candidate(by_cost, "cheap").score > candidate(by_cost, "clean").score


def test_ties_go_to_the_alphabetically_first_id_even_when_it_is_a_prefix():
    decision = place(job(), tenant(), [view(site("gpu")), view(site("gpu-2"))])
    assert decision.site == "gpu"


# --- property ------------------------------------------------------------------------------------------------------

COUNTRIES = ("FR", "DE", "NL", "US")
CERTS = ("hds", "iso27001", "secnumcloud")
TYPES = ("H100", "A100", "L40S", "L4")


@st.composite
def site_views(draw, site_id: str) -> SiteView:
    country = draw(st.sampled_from(COUNTRIES))
    jurisdiction = draw(st.sampled_from(("EU", "US"))) if country != "US" else "US"
    gpus = draw(st.dictionaries(st.sampled_from(TYPES), st.integers(0, 8), min_size=1, max_size=3))
    entry = site(site_id, kind=draw(st.sampled_from(("public_hpc", "private_cloud", "partner"))), country=country,
                 jurisdiction=jurisdiction, certifications=tuple(draw(st.sets(st.sampled_from(CERTS)))), gpus=gpus)
    free = {t: draw(st.integers(0, n)) for t, n in gpus.items()}
    return SiteView(entry=entry, up=draw(st.booleans()), free=free)


@st.composite
def catalogs(draw) -> list[SiteView]:
    ids = draw(st.lists(st.sampled_from(("a", "b", "c", "d", "e", "f")), min_size=1, max_size=5, unique=True))
    return [draw(site_views(i)) for i in ids]


tenants = st.builds(tenant, allocation=st.sampled_from((0.0, 100.0)),
                    overflow=st.sampled_from(("allowed", "forbidden")),
                    residency=st.sampled_from(("EU", "any", "FR", "DE")))
specs = st.builds(job, gpus=st.integers(0, 6), gpu_type=st.sampled_from(("any", *TYPES)), nodes=st.integers(1, 2),
                  residency=st.sampled_from((None, "EU", "any", "FR", "NL")),
                  certifications=st.lists(st.sampled_from(CERTS), max_size=2, unique=True),
                  overflow=st.sampled_from(("allowed", "forbidden")))


@settings(max_examples=200, deadline=None, database=None)
@given(views=catalogs(), spec=specs, who=tenants)
def test_a_chosen_site_never_breaks_a_hard_constraint(views, spec, who):
    decision = place(spec, who, views)
    assert sorted(c.site for c in decision.candidates) == sorted(v.id for v in views)
    if decision.site is None:
        assert decision.impossible == all(permanent_reasons(spec, who, v.entry) for v in views)
        return
    assert decision.impossible is False
    chosen = next(v for v in views if v.id == decision.site)
    entry = chosen.entry
    assert chosen.up
    residency = spec.residency or who.residency
    if residency == "EU":
        assert entry.jurisdiction == "EU"
    elif residency != "any":
        assert entry.country == residency
    assert set(spec.certifications) <= set(entry.certifications)
    need = spec.resources.total_gpus
    if need:
        assert decision.gpu_type in entry.gpus
        assert spec.resources.gpu_type in ("any", decision.gpu_type)
        assert chosen.free[decision.gpu_type] >= need
    if entry.public:
        assert who.allocation_gpu_hours > 0
    else:
        assert spec.overflow == "allowed" and who.overflow == "allowed"
    public_could = any(v.entry.public and not permanent_reasons(spec, who, v.entry) for v in views)
    assert decision.overflow == (not entry.public and public_could)
    # public first: a tenant with hours only leaves public capacity when no public site could take the job now
    eligible = {c.site for c in decision.candidates if c.eligible}
    assert decision.site in eligible
    if decision.overflow:
        assert not any(v.entry.public for v in views if v.id in eligible)


# --- governed overflow, budgets, re-placement --------------------------------------------------------------------

def lab(threshold: float = 1800.0, **fields) -> TenantEntry:
    return TenantEntry(id="acme", allocation_gpu_hours=1000, overflow_after_wait_s=threshold, monthly_budget_eur=1000,
                       **fields)


def busy_public(ends_in_s: float) -> SiteView:
    """A public site whose 8 H100 are all held by one job, due back in `ends_in_s`."""
    return SiteView(entry=site("public", kind="public_hpc", gpus={"H100": 8}), up=True, free={"H100": 0},
                    holdings=(Holding("H100", 8, ends_in_s),))


def test_a_short_public_wait_keeps_the_job_waiting_for_public_capacity():
    paid = site("paid", gpus={"H100": 8})
    decision = place(job(gpus=2, gpu_type="H100"), lab(threshold=1800), [busy_public(600), view(paid)])
    assert decision.site is None and not decision.impossible
    assert candidate(decision, "public").reasons == ["needs 2 H100 GPUs now, 0 free (expected in 600 s)"]
    assert "within the tenant's overflow threshold of 1800 s" in candidate(decision, "paid").reasons[0]


def test_a_long_public_wait_overflows_to_paid_capacity():
    paid = site("paid", gpus={"H100": 8})
    decision = place(job(gpus=2, gpu_type="H100"), lab(threshold=1800), [busy_public(7200), view(paid)])
    assert decision.site == "paid" and decision.overflow is True
    assert candidate(decision, "public").parts["wait_s"] == 7200


def saturated_public(queued: int, forecast_s: float) -> SiteView:
    """A public site with GPUs free by Continuum's own reservations, that capacity reports saturated with a
    queue of its own (a shared Slurm full of other work) and a forecast wait."""
    return SiteView(entry=site("public", kind="public_hpc", gpus={"H100": 8}), up=True, free={"H100": 8},
                    queued_at_site=queued, reported_wait_s={"H100": forecast_s})


def test_a_saturated_public_site_with_a_long_forecast_lets_the_job_overflow():
    decision = place(job(gpus=2, gpu_type="H100"), lab(threshold=1800), [saturated_public(5, 7200), view(site("paid"))])
    assert decision.site == "paid" and decision.overflow is True
    assert candidate(decision, "public").reasons == ["saturated: 5 jobs queue at the site (expected in 7200 s)"]
    assert candidate(decision, "public").parts["wait_s"] == 7200


def test_a_saturated_public_site_with_a_short_forecast_keeps_the_job_waiting():
    decision = place(job(gpus=2, gpu_type="H100"), lab(threshold=1800), [saturated_public(5, 600), view(site("paid"))])
    assert decision.site is None and not decision.impossible
    assert "within the tenant's overflow threshold" in candidate(decision, "paid").reasons[0]


def test_saturation_without_a_queue_at_the_site_changes_nothing():
    decision = place(job(gpus=2, gpu_type="H100"), lab(threshold=1800), [saturated_public(0, 7200), view(site("paid"))])
    assert decision.site == "public" and not decision.overflow


def test_a_deadline_that_public_cannot_meet_overflows_at_once():
    now = datetime(2026, 11, 25, 12, tzinfo=UTC)
    spec = job(gpus=2, gpu_type="H100", walltime_s=3600, deadline=now + timedelta(hours=1, minutes=10))
    decision = place(spec, lab(threshold=1800), [busy_public(1200), view(site("paid"))], now=now)
    assert decision.site == "paid" and decision.overflow is True


def test_overflow_stays_within_the_private_sites_share():
    paid = site("paid", gpus={"H100": 8}, overflow_share=0.5)
    held = SiteView(entry=paid, up=True, free={"H100": 5}, holdings=(Holding("H100", 3, 100.0, overflow=True),))
    decision = place(job(gpus=2, gpu_type="H100"), lab(threshold=0), [busy_public(7200), held])
    assert decision.site is None
    assert candidate(decision, "paid").reasons == ["overflow share full: overflow jobs hold 3 of 4 H100 GPUs allowed"]
    # a tenant without public hours is not overflowing: the share does not bind it
    assert place(job(gpus=2, gpu_type="H100"), tenant(), [held]).site == "paid"


def test_the_tenants_remaining_budget_bounds_paid_placements():
    paid = site("paid", price_eur_per_gpu_hour={"H100": 2.0})
    spec = job(gpus=2, gpu_type="H100", walltime_s=3600)  # worst case 4 EUR
    assert place(spec, tenant(), [view(paid)], budget=TenantBudget(budget_left_eur=4.0)).site == "paid"
    decision = place(spec, tenant(), [view(paid)], budget=TenantBudget(budget_left_eur=3.99))
    assert decision.site is None and not decision.impossible
    assert candidate(decision, "paid").reasons == ["monthly budget spent: 3.99 EUR left, the job may cost 4.00 EUR"]


def test_a_job_whose_own_budget_no_site_fits_is_impossible():
    paid = site("paid", price_eur_per_gpu_hour={"H100": 2.0})
    decision = place(job(gpus=2, gpu_type="H100", walltime_s=3600, budget_eur=3.0), tenant(), [view(paid)])
    assert decision.impossible
    assert candidate(decision, "paid").reasons == ["worst-case cost 4.00 EUR exceeds the job's budget 3.00 EUR"]


def test_a_spent_allocation_stops_public_placement():
    public = site("public", kind="public_hpc", gpus={"H100": 8}, allocation_factor={"H100": 4.0})
    spec = job(gpus=1, gpu_type="H100", walltime_s=3600)  # 4 allocation hours at most
    decision = place(spec, lab(), [view(public)], budget=TenantBudget(allocation_left_h=3.0))
    assert decision.site is None
    assert candidate(decision, "public").reasons == ["allocation spent: 3.0 h left, the job may use 4.0 h"]


def test_a_site_that_refused_the_job_is_avoided_with_its_words():
    decision = place(job(), tenant(), [view(site("a")), view(site("b"))], avoid={"a": "site refused: busy"})
    assert decision.site == "b"
    assert candidate(decision, "a").reasons == ["site refused: busy"]


def test_a_site_that_refused_the_job_for_good_is_ineligible_and_alone_makes_it_impossible():
    refused = {"a": "sbatch: Memory specification can not be satisfied"}
    decision = place(job(), tenant(), [view(site("a")), view(site("b"))], refused=refused)
    assert decision.site == "b" and not decision.impossible
    assert candidate(decision, "a").reasons == ["refused this job: sbatch: Memory specification can not be satisfied"]
    alone = place(job(), tenant(), [view(site("a"))], refused=refused)
    assert alone.site is None and alone.impossible


# --- what a job's requeues say -------------------------------------------------------------------------------

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)


def requeued(site_id: str, at_s: float, reason: str, refusal: str | None = None, n: int = 0) -> HistoryEntry:
    return HistoryEntry(state=JobState.requeued, time=T0 + timedelta(seconds=at_s), event_id=f"e{site_id}{n}{at_s}",
                        site=site_id, reason=reason, **({"refusal": refusal} if refusal else {}))


def test_a_lost_job_avoids_its_site_for_a_while_then_goes_back():
    history = [requeued("a", 0, "site a went down before the job started there")]
    assert departures(history, T0 + timedelta(seconds=10)).avoid == {
        "a": f"site a went down before the job started there (tried again in {AVOID_S - 10:.0f} s)"}
    assert departures(history, T0 + timedelta(seconds=AVOID_S + 1)).avoid == {}


def test_passing_refusals_back_off_doubling_and_give_up_after_their_bound():
    history = [requeued("a", 0, "site refused: sbatch: Socket timed out", "transient", 0)]
    assert "a" in departures(history, T0 + timedelta(seconds=TRANSIENT_BACKOFF_S - 1)).avoid
    assert departures(history, T0 + timedelta(seconds=TRANSIENT_BACKOFF_S + 0.1)).avoid == {}
    history.append(requeued("a", 10, "site refused: sbatch: Socket timed out", "transient", 1))
    assert "a" in departures(history, T0 + timedelta(seconds=10 + 2 * TRANSIENT_BACKOFF_S - 1)).avoid
    assert departures(history, T0 + timedelta(seconds=10 + 2 * TRANSIENT_BACKOFF_S + 0.1)).give_up is None
    many = [requeued("a", i, "site refused: sbatch: busy", "transient", i) for i in range(MAX_TRANSIENT_REFUSALS)]
    assert departures(many, T0).give_up.startswith(f"refused {MAX_TRANSIENT_REFUSALS} times by sites that were busy")
    # passing refusals do not use up the placements a job gets when sites lose it
    assert departures(many[:-1], T0).give_up is None


def test_a_refusal_for_good_is_kept_and_the_attempts_are_bounded():
    history = [requeued("a", 0, "site refused: sbatch: Invalid account", "permanent")]
    left = departures(history, T0 + timedelta(days=1))
    assert left.refused == {"a": "site refused: sbatch: Invalid account"} and left.avoid == {}
    lost = [requeued(s, i, f"site {s} went down", n=i) for i, s in enumerate("abcd"[:MAX_ATTEMPTS])]
    assert departures(lost, T0).give_up == (f"placed {MAX_ATTEMPTS} times, refused or lost every time; "
                                            "last: site d went down")
    assert departures(lost[:-1], T0).give_up is None


# --- a Slurm site's known limits -----------------------------------------------------------------------------

def test_a_job_beyond_a_slurm_sites_known_limits_is_ineligible_there_before_any_dispatch():
    limits = SlurmOptions(max_mem_per_node_gb=8, max_cpus_per_node=32, max_nodes=2, max_walltime_s=72_000)
    slurm = site("jz", backend="slurm", slurm=limits)
    big = JobSpec(tenant="acme", command=["run"], walltime_s=100_000,
                  resources=Resources(gpus=1, memory_gb=64, cpus=40, nodes=4))
    assert permanent_reasons(big, tenant(), slurm) == [
        "asks 64 GB of memory a node, the site's nodes have at most 8 GB",
        "asks 40 CPUs a task, the site's nodes have at most 32",
        "asks 4 nodes, the site allows at most 2 a job",
        "asks a walltime of 100000 s, the site allows at most 72000 s"]
    # what a job leaves unset is the site's to decide: never a reason
    assert permanent_reasons(job(), tenant(), slurm) == []
    decision = place(big.model_copy(update={"overflow": "forbidden"}), tenant(allocation=1e6),
                     [view(slurm.model_copy(update={"kind": "public_hpc"}))])
    assert decision.impossible


@st.composite
def loaded_views(draw, site_id: str) -> SiteView:
    """A site with prices, an overflow share and jobs holding some of its GPUs, some of them overflow."""
    base = draw(site_views(site_id))
    entry = base.entry.model_copy(update={
        "price_eur_per_gpu_hour": {t: draw(st.floats(0.0, 4.0)) for t in base.entry.gpus},
        "allocation_factor": {t: draw(st.sampled_from((1.0, 2.0, 4.0))) for t in base.entry.gpus},
        "overflow_share": draw(st.sampled_from((0.0, 0.25, 0.5, 1.0)))})
    holdings = tuple(Holding(t, entry.gpus[t] - base.free[t], draw(st.floats(0, 7200)), draw(st.booleans()))
                     for t in entry.gpus if entry.gpus[t] > base.free[t])
    return SiteView(entry=entry, up=base.up, free=base.free, holdings=holdings)


@st.composite
def loaded_catalogs(draw) -> list[SiteView]:
    ids = draw(st.lists(st.sampled_from(("a", "b", "c", "d", "e")), min_size=1, max_size=5, unique=True))
    return [draw(loaded_views(i)) for i in ids]


budgets = st.builds(TenantBudget, allocation_left_h=st.floats(-10, 50), budget_left_eur=st.floats(-10, 50))
thresholds = st.builds(lab, threshold=st.sampled_from((0.0, 600.0, 1800.0, 10_000.0)),
                       overflow=st.sampled_from(("allowed", "forbidden")))
priced_specs = st.builds(job, gpus=st.integers(1, 6), gpu_type=st.sampled_from(("any", *TYPES)),
                         walltime_s=st.sampled_from((600, 3600, 14_400)),
                         residency=st.sampled_from((None, "EU", "FR")),
                         overflow=st.sampled_from(("allowed", "forbidden")),
                         budget_eur=st.one_of(st.none(), st.floats(0, 40)))


@settings(max_examples=300, deadline=None, database=None)
@given(views=loaded_catalogs(), spec=priced_specs, who=st.one_of(thresholds, tenants), budget=budgets)
def test_a_placement_never_breaks_overflow_rules_or_budgets(views, spec, who, budget):
    decision = place(spec, who, views, budget)
    if decision.site is None:
        return
    chosen = next(v for v in views if v.id == decision.site)
    entry, need, gpu_type = chosen.entry, spec.resources.total_gpus, decision.gpu_type
    hours = spec.walltime_s / 3600
    assert chosen.free[gpu_type] >= need
    if entry.public:
        assert need * hours * entry.allocation_factor.get(gpu_type, 1.0) <= budget.allocation_left_h
        return
    worst = need * hours * entry.price(gpu_type)
    assert worst <= budget.budget_left_eur
    assert spec.budget_eur is None or worst <= spec.budget_eur
    assert spec.overflow == "allowed" and who.overflow == "allowed"
    if decision.overflow:
        # within the private site's share, and only past the public wait threshold
        assert chosen.overflow_held(gpu_type) + need <= int(entry.overflow_share * entry.gpus[gpu_type])
        public = [v for v in views if v.entry.public and not permanent_reasons(spec, who, v.entry)]
        fits_now = [v for v in public if v.up and v.free.get(decision.gpu_type, 0) >= need]
        assert not any(c.eligible for c in decision.candidates if c.site in {v.id for v in fits_now})


def test_a_job_budget_holds_back_a_dearer_type_even_when_a_cheaper_one_fits_it():
    # hypothesis found it: L4 fits the job's 1 EUR, so the site can run the job; only L4, not the free H100
    cloud = site("cloud", gpus={"L4": 4, "H100": 4}, price_eur_per_gpu_hour={"L4": 0.5, "H100": 3.0})
    spec = job(gpus=1, gpu_type="any", walltime_s=3600, budget_eur=1.0)

    waits = place(spec, tenant(), [view(cloud, free={"L4": 0, "H100": 4})])
    runs = place(spec, tenant(), [view(cloud, free={"L4": 1, "H100": 4})])

    assert waits.site is None and not waits.impossible
    assert candidate(waits, "cloud").holds == ["gpus"]  # for an L4
    assert (runs.site, runs.gpu_type) == ("cloud", "L4")


def test_a_job_larger_than_the_tenants_whole_budget_or_grant_is_impossible():
    paid = site("paid", price_eur_per_gpu_hour={"H100": 2.0})
    public = site("public", kind="public_hpc", gpus={"H100": 8}, allocation_factor={"H100": 4.0})
    poor = TenantEntry(id="acme", allocation_gpu_hours=10, monthly_budget_eur=5)
    decision = place(job(gpus=2, gpu_type="H100", walltime_s=7200), poor, [view(paid), view(public)])
    assert decision.impossible
    assert candidate(decision, "paid").reasons == [
        "worst-case cost 8.00 EUR exceeds the tenant's monthly budget 5.00 EUR"]
    assert candidate(decision, "public").reasons == ["may use 16.0 allocation hours, the tenant's grant is 10.0"]
    unfunded = TenantEntry(id="acme", monthly_budget_eur=0)
    assert candidate(place(job(), unfunded, [view(paid)]), "paid").reasons == ["tenant has no budget for paid capacity"]


# --- the line ahead, and what holds a waiting job back ---------------------------------------------------------

def test_the_public_wait_runs_out_the_line_ahead_and_opens_overflow_past_the_threshold():
    hpc = site("hpc", kind="public_hpc", gpus={"H100": 4})
    cloud = site("cloud", gpus={"H100": 8})
    lab = tenant(allocation=1000).model_copy(update={"overflow_after_wait_s": 5400})
    busy = SiteView(entry=hpc, up=True, free={"H100": 0}, holdings=(Holding("H100", 4, 3600.0),))
    # alone, the job would have the public GPUs in 1 h (within 1.5 h): public capacity first, it waits
    alone = place(job(gpus=4, walltime_s=3600), lab, [busy, view(cloud)])
    assert alone.site is None and alone.holds == {"hpc": {Hold.GPUS}, "cloud": {Hold.GATE}}
    assert "expected public wait 3600 s" in candidate(alone, "cloud").reasons[0]
    # behind a 4-GPU job of 1 h in line, it would have them in 2 h: it overflows now
    queued = SiteView(entry=hpc, up=True, free={"H100": 0}, holdings=busy.holdings, queue=(("H100", 4, 3600.0),))
    assert queued.wait_s("H100", 4) == 7200.0
    behind = place(job(gpus=4, walltime_s=3600), lab, [queued, view(cloud)])
    assert (behind.site, behind.overflow) == ("cloud", True)


def test_public_capacity_first_holds_a_paid_site_that_something_else_holds_too():
    # the paid site's GPUs are busy as well: the job waits for the public ones, and says the gate holds the
    # paid site too (so it stands in no paid line: it would not take those GPUs if they came back now)
    hpc = site("hpc", kind="public_hpc", gpus={"H100": 4})
    lab = tenant(allocation=1000).model_copy(update={"overflow_after_wait_s": 5400})
    busy_hpc = SiteView(entry=hpc, up=True, free={"H100": 0}, holdings=(Holding("H100", 4, 3600.0),))
    busy_cloud = view(site("cloud", gpus={"H100": 8}), free={"H100": 0})
    decision = place(job(gpus=4, walltime_s=3600), lab, [busy_hpc, busy_cloud])
    assert decision.site is None and decision.holds == {"hpc": {Hold.GPUS}, "cloud": {Hold.GPUS, Hold.GATE}}
    needs, gate = candidate(decision, "cloud").reasons
    assert needs.startswith("needs 4 H100 GPUs now, 0 free") and gate.startswith("public capacity first")


# --- retries -------------------------------------------------------------------------------------------------

def test_a_waiting_job_is_tried_again_sooner_the_higher_its_priority_and_less_often_the_longer_it_waits():
    from services.routing.policy import retry_delay_s

    assert retry_delay_s(1.0, priority=9, tries=0) == 1.0
    assert retry_delay_s(1.0, priority=0, tries=0) == 2.0
    assert retry_delay_s(1.0, priority=9, tries=20) == 5.0
    assert retry_delay_s(1.0, priority=0, tries=20) == 10.0  # the most: ten times the base
    assert retry_delay_s(1.0, priority=0, tries=1000) == 10.0
    now = datetime(2026, 12, 2, 12, tzinfo=UTC)
    assert retry_delay_s(1.0, 9, 0, now, wait_until=now + timedelta(hours=2)) == 7200.0  # a greener hour: then


# --- what each site's reasons are ------------------------------------------------------------------------------

def test_each_candidate_says_whether_its_site_takes_the_job_waits_on_something_or_never_can():
    free = site("free", gpus={"H100": 8})
    busy = site("busy", gpus={"H100": 8})
    small = site("small", gpus={"H100": 2})
    decision = place(job(gpus=4), tenant(), [view(free), view(busy, free={"H100": 0}), view(small)])

    kinds = {c.site: (c.eligible, c.holds) for c in decision.candidates}
    assert kinds == {"free": (True, []), "busy": (False, [Hold.GPUS]), "small": (False, [])}
    assert candidate(decision, "small").reasons == ["needs 4 any GPUs, has 2"]  # never: no hold
    assert decision.holds == {"busy": frozenset({Hold.GPUS})}
    # the published decision says the same once read back
    assert type(decision).model_validate_json(decision.model_dump_json()).holds == decision.holds


def test_a_job_waiting_for_a_greener_hour_says_so_at_the_site_it_waits_for():
    now = datetime(2026, 12, 2, 10, 20, tzinfo=UTC)
    grid = {10: 120.0, 11: 110.0, 12: 45.0}
    green = site("green")
    decision = place(job(objective="carbon", deadline=now + timedelta(hours=6), walltime_s=3600), tenant(),
                     [view(green)], now=now, forecast=lambda s, at: grid.get(at.hour, 200.0))

    assert decision.site is None and decision.wait_until == now.replace(hour=12, minute=0)
    assert candidate(decision, "green").holds == [Hold.GREENER]
    assert "waiting for 12:00 UTC" in candidate(decision, "green").reasons[0]


# --- steps and files: where a site stages them ---------------------------------------------------------------

def staging(**files) -> JobSpec:
    return JobSpec(tenant="acme", command=["sh", "job.sh"], resources=Resources(gpus=1), **files)


def test_a_job_with_files_goes_only_where_its_files_can_be_staged():
    beneath = site("local", backend="local", files_root="/srv/continuum")
    none = site("sim")  # a simulated site stages no files
    elsewhere = site("scratch", backend="slurm", files_root="/scratch")
    spec = staging(inputs=[{"path": "/srv/continuum/w/job.sh", "content": "echo hi"}],
                   outputs=[{"path": "/srv/continuum/w/out", "url": "file:///srv/continuum/results/out"}])
    decision = place(spec, tenant(), [view(none), view(elsewhere), view(beneath)])
    assert decision.site == "local"
    assert candidate(decision, "sim").reasons == ["stages no files (inputs.0)"]
    assert candidate(decision, "scratch").reasons == ["inputs.0.path is outside /scratch (and 2 more)"]


@pytest.mark.parametrize(("files", "said"), [
    ({"inputs": [{"path": "/srv/continuum/in", "url": "file:///home/agent/.continuum/creds/site-local.nk"}]},
     "inputs.0.url is outside /srv/continuum"),
    ({"outputs": [{"path": "/srv/continuum/out", "url": "file:///home/agent/.bashrc"}]},
     "outputs.0.url is outside /srv/continuum"),
    ({"outputs": [{"path": "/etc/passwd", "url": "file:///srv/continuum/out"}]},
     "outputs.0.path is outside /srv/continuum"),
    # a sibling whose name begins with the root's is not beneath it
    ({"inputs": [{"path": "/srv/continuum-other/in", "content": "x"}]}, "inputs.0.path is outside /srv/continuum"),
    ({"steps": [{"command": ["sh", "job.sh"], "stdout": "/home/agent/.profile"}]},
     "steps.0.stdout is outside /srv/continuum"),
    ({"steps": [{"command": ["sh", "job.sh"]}, {"command": ["x"], "workdir": "/tmp"}]},
     "steps.1.workdir is outside /srv/continuum"),
])
def test_a_path_or_url_outside_the_sites_files_root_makes_the_job_impossible_there(files, said):
    local = site("local", backend="local", files_root="/srv/continuum")
    assert permanent_reasons(staging(**files), tenant(), local) == [said]
    decision = place(staging(**files), tenant(), [view(local)])
    assert decision.impossible and decision.reasons == [f"local: {said}"]


def test_a_site_without_files_root_takes_steps_that_need_no_files_but_no_redirection():
    sim = site("sim")
    steps = [{"command": ["sh", "job.sh"], "env": {"A": "1"}}, {"command": ["true"], "ignore_error": True}]
    assert permanent_reasons(staging(steps=steps), tenant(), sim) == []
    steps[1]["stderr"] = "/srv/continuum/err"
    assert permanent_reasons(staging(steps=steps), tenant(), sim) == ["stages no files (steps.1.stderr)"]


def test_a_files_root_takes_every_path_beneath_it_and_the_root_itself():
    local = site("local", backend="local", files_root="/srv/continuum")
    spec = staging(steps=[{"command": ["sh", "job.sh"], "workdir": "/srv/continuum"}],
                   inputs=[{"path": "/srv/continuum/a/b/c", "url": "file:///srv/continuum/in%20put"}])
    assert permanent_reasons(spec, tenant(), local) == []
    assert permanent_reasons(spec, tenant(), site("all", backend="local", files_root="/")) == []
