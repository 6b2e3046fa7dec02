"""JetStream topology as data, the typed publish/consume layer, and the nats-server fixture."""
