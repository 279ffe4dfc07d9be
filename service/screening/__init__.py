"""Population screening: run the rules over every patient of a FHIR Bulk Data export.

- `ndjson`: which patient each NDJSON line belongs to, and what could not be placed;
- `core`: one patient (or one group of them) in, flagged rows out; no I/O, no executor;
- `pool`: the single-machine process pool (`screen --engine processes`, `replay --screen`);
- `distributed`: the same work on Dask, a LocalCluster or an existing scheduler;
- `bulk_export`: the Bulk Data $export client (`screen --from-fhir`);
- `output`: CSV, NDJSON or Parquet, and the summary;
- `command`: the `screen` console command.

Dask is imported only by `distributed` and `command`, so `replay` works without it.
"""
