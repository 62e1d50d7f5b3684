"""The consortium operator's side of hmgdm: SuperLink, ServerApp, aggregation and studies."""
