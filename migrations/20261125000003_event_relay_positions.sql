-- How far the NATS JetStream relay has published each organization's change
-- events: durable, so that a restart (of the service or of NATS) resumes
-- after the last acknowledged event, without a gap. Duplicates a restart may
-- publish again carry the same Nats-Msg-Id, which JetStream drops.
CREATE TABLE event_relay_positions (
    organization_id text   NOT NULL PRIMARY KEY,
    relayed_through bigint NOT NULL
);
