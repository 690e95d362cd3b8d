-- Onboarding state in the read model (projection-owned, rebuildable).
ALTER TABLE users ADD COLUMN waitlisted boolean NOT NULL DEFAULT false;

CREATE TABLE identity_links (
    provider text NOT NULL,
    subject  text NOT NULL,
    username text NOT NULL,
    linked_at timestamptz NOT NULL,
    PRIMARY KEY (provider, subject)
);
CREATE INDEX identity_links_by_user ON identity_links (username);

-- Browser logins in flight (authorization code + PKCE): identity's own
-- short-lived state, so any replica can complete a login another began.
CREATE TABLE oidc_pending_logins (
    state         text PRIMARY KEY,
    provider      text NOT NULL,
    nonce         text NOT NULL,
    pkce_verifier text NOT NULL,
    expires_at    timestamptz NOT NULL
);
CREATE INDEX oidc_pending_logins_by_expiry ON oidc_pending_logins (expires_at);
