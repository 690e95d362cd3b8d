// A real OpenID Provider for identity's tests: the `oidc-provider` package
// with one confidential client, authorization code + PKCE and the device
// authorization grant. Its login page accepts any username (the tests are
// about the relying party, not this provider's accounts); each account's
// claims are derived from the name so tests can predict them.
//
// Usage: node server.mjs   (configuration from the environment)
//   OIDC_CLIENT_ID, OIDC_CLIENT_SECRET, OIDC_REDIRECT_URI
// Prints `listening <issuer>` on stdout once it accepts requests.

import http from 'node:http';
import Provider from 'oidc-provider';

const clientId = process.env.OIDC_CLIENT_ID ?? 'k8shell';
const clientSecret = process.env.OIDC_CLIENT_SECRET ?? 'k8shell-test-secret';
const redirectUri = process.env.OIDC_REDIRECT_URI ?? 'http://127.0.0.1:9/callback';

// The issuer must name the port, so listen first and build the provider
// once the port is known.
const server = http.createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

function claimsOf(login) {
  return {
    sub: `sub-${login}`,
    preferred_username: login,
    email: `${login}@example.test`,
    email_verified: true,
    name: `User ${login}`,
    groups: login.startsWith('admin') ? ['k8shell-admins', 'developers'] : ['developers'],
  };
}

const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  scopes: ['openid', 'email', 'profile', 'groups'],
  cookies: { keys: ['k8shell-test-cookie-key'] },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true,
      // Plain pages: the tests read the hidden form fields and post them.
      userCodeInputSource: async (ctx, form) => { ctx.body = `<html><body>${form}</body></html>`; },
      userCodeConfirmSource: async (ctx, form) => { ctx.body = `<html><body>${form}</body></html>`; },
      successSource: async (ctx) => { ctx.body = '<html><body>device-login-complete</body></html>'; },
    },
  },
  async findAccount(ctx, id) {
    return { accountId: id, claims: async () => claimsOf(id.replace(/^sub-/, '')) };
  },
  ttl: { DeviceCode: 300, AuthorizationCode: 60, AccessToken: 600, IdToken: 600, Interaction: 600, Session: 600, Grant: 600 },
});
provider.proxy = false;

async function readForm(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return new URLSearchParams(body);
}

// The login "page": GET shows a form, POST logs the named account in and
// grants every scope the client asked for (no separate consent step).
async function interaction(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (req.method === 'GET') {
    res.setHeader('content-type', 'text/html');
    res.end(`<html><body><form method="post" action="/interaction/${uid}"><input name="login"></form></body></html>`);
    return;
  }
  const form = await readForm(req);
  const login = form.get('login');
  if (!login) {
    res.statusCode = 400;
    res.end('login is required');
    return;
  }
  const accountId = `sub-${login}`;
  const grant = new provider.Grant({ accountId, clientId: details.params.client_id });
  grant.addOIDCScope(details.params.scope);
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { login: { accountId }, consent: { grantId } }, { mergeWithLastSubmission: false });
}

const callback = provider.callback();
server.on('request', (req, res) => {
  const match = /^\/interaction\/([^/?]+)/.exec(req.url);
  if (!match) {
    callback(req, res);
    return;
  }
  interaction(req, res, match[1]).catch((error) => {
    console.error(error);
    res.statusCode = 500;
    res.end(String(error));
  });
});

console.log(`listening ${issuer}`);
