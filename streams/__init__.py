"""JetStream topology as data, the typed publish/consume layer, and the nats-server fixture.

Subjects, streams, consumer groups, the ack / redelivery / dead-letter policy, schema evolution
and how to run a cluster are documented in ``docs/streams.md``.
"""
