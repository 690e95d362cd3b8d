-- Keys are published before they sign: a key is created "next" (in the
-- JWKS, activated_at NULL) one rotation period before it becomes the
-- signer, so verifiers that cache the JWKS — k8shelld in a running
-- workspace — know a key before the first token signed with it arrives.
ALTER TABLE signing_keys ADD COLUMN activated_at timestamptz;
UPDATE signing_keys SET activated_at = created_at;
