"""A discrete-event simulator of a model's instances under the project's own scheduling policies.

It is a simulator: it never stands in for vLLM where a test or a benchmark claims vLLM. It is
the tool for studying policies at 16-64 instances (Llumnix's scale) on a small machine.

What is real: dispatch (`dispatch.choose_instance`), rescheduling (`rescheduling.plan_migrations`)
and the migration room check, called with the same `InstanceSnapshot`s the engines publish.
What is modelled (`instance.py`), after vLLM V1's scheduler: the block allocator, chunked
prefill under a token budget and `max_num_seqs`, the priority queue, preemption by
recomputation, and a step time fitted to steps measured on real engines (`profile.py`, the
profiles in `profiles/`); a migration costs what `benchmarks/migration_downtime.py` measured.
"""

from llumnix_backend.simulator.cluster import Simulation, SimulationResult, WorkloadItem
from llumnix_backend.simulator.instance import SimRequest
from llumnix_backend.simulator.profile import EngineProfile, load_profile

__all__ = ["EngineProfile", "SimRequest", "Simulation", "SimulationResult", "WorkloadItem", "load_profile"]
