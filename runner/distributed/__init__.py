"""Running a job's tenants on a Ray cluster (`[job] engine = "ray"`).

Rate limits and budgets are per tenant, so the unit of distribution is a group
of whole tenants: each worker runs the ordinary local engine on its own shard,
with its own SQLite checkpoint, and never talks to another worker.

- `plan`: tenants -> groups balanced by expected work;
- `shards`: the driver's state database <-> shard files and shard databases
  (shard rows out, outcomes and ledger entries back in, budgets handed over);
- `worker`: what one Ray task does with one shard;
- `dataset`: the merged result table split into one file per shard;
- `driver`: the run itself; the only module that imports Ray.
"""
