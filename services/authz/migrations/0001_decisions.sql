-- The decision log, kept by the `authz-decisions` projection from the
-- K8SHELL_AUTHZ stream: one row per (folded) decision event.
CREATE TABLE decisions (
    sequence      bigint PRIMARY KEY,
    subject       text NOT NULL,
    roles         text[] NOT NULL DEFAULT '{}',
    action        text NOT NULL,
    resource_type text NOT NULL,
    resource_id   text NOT NULL DEFAULT '',
    allow         boolean NOT NULL,
    reasons       text[] NOT NULL DEFAULT '{}',
    obligations   jsonb NOT NULL DEFAULT '{}',
    count         bigint NOT NULL,
    first_at      timestamptz NOT NULL,
    last_at       timestamptz NOT NULL,
    engine        text NOT NULL
);
CREATE INDEX decisions_by_subject ON decisions (subject, last_at DESC);
CREATE INDEX decisions_by_action ON decisions (action, last_at DESC);
CREATE INDEX decisions_by_time ON decisions (last_at DESC);
