"""Patient data from prefetch or the EHR's FHIR server: the only importer of fhir.resources and requests."""
