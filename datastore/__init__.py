"""Datastores: the embedded SQLite store, Kubernetes API informers, object converters and
manifest loading. The agent reads cluster state only through `base.Datastore`."""
