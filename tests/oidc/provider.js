// A real OpenID Connect provider (npm oidc-provider 8.8.1) for the login tests, on loopback only.
//
//   node tests/oidc/provider.js --port 9000 --clients '<json>' --accounts '<json>'
//
// --clients:  JSON list of oidc-provider client metadata (client_id, client_secret, redirect_uris)
// --accounts: JSON list of {"sub", "password", "preferred_username"?, "name"?, "groups": [...]}
//
// The login page is a plain HTML form (user name + password, checked against --accounts); a
// wrong password re-displays the form with an error. Consent is implicit for the configured
// clients (first-party), as a TRE's institutional IdP would be configured.
// Prints "READY <issuer>" on stdout once it listens.
'use strict';

const http = require('node:http');
const crypto = require('node:crypto');

function argValue(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  if (i === -1) {
    if (fallback === undefined) throw new Error(`missing --${name}`);
    return fallback;
  }
  return process.argv[i + 1];
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > 65536) reject(new Error('body too large'));
      else chunks.push(c);
    });
    req.on('end', () => resolve(new URLSearchParams(Buffer.concat(chunks).toString('utf8'))));
    req.on('error', reject);
  });
}

function loginPage(uid, error) {
  return `<!doctype html><html><head><title>Institutional login</title></head><body>
<h1>Institutional login</h1>
${error ? `<p id="error" role="alert">${escapeHtml(error)}</p>` : ''}
<form method="post" action="/interaction/${escapeHtml(uid)}/login">
  <label>User name <input name="login" autocomplete="username" autofocus></label>
  <label>Password <input name="password" type="password" autocomplete="current-password"></label>
  <button type="submit">Sign in</button>
</form></body></html>`;
}

function passwordMatches(expected, given) {
  const a = crypto.createHash('sha256').update(String(expected)).digest();
  const b = crypto.createHash('sha256').update(String(given)).digest();
  return crypto.timingSafeEqual(a, b);
}

async function main() {
  const { default: Provider } = await import('oidc-provider');
  const port = Number(argValue('port'));
  const host = argValue('host', '127.0.0.1');
  const issuer = argValue('issuer', `http://${host}:${port}`);
  const clients = JSON.parse(argValue('clients'));
  const accounts = new Map(JSON.parse(argValue('accounts')).map((a) => [a.sub, a]));

  const provider = new Provider(issuer, {
    clients: clients.map((c) => ({
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      ...c,
    })),
    claims: {
      openid: ['sub'],
      profile: ['preferred_username', 'name'],
      groups: ['groups'],
    },
    scopes: ['openid', 'profile', 'groups', 'offline_access'],
    features: { devInteractions: { enabled: false } },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    async findAccount(ctx, id) {
      const account = accounts.get(id);
      if (!account) return undefined;
      return {
        accountId: id,
        async claims() {
          return {
            sub: id,
            preferred_username: account.preferred_username || id,
            name: account.name || id,
            groups: account.groups || [],
          };
        },
      };
    },
    // First-party clients: grant the requested OIDC scopes and claims without a consent screen.
    async loadExistingGrant(ctx) {
      const grantId =
        ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) return ctx.oidc.provider.Grant.find(grantId);
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope('openid profile groups offline_access');
      grant.addOIDCClaims(['preferred_username', 'name', 'groups']);
      await grant.save();
      return grant;
    },
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  const callback = provider.callback();

  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, issuer);
    const match = url.pathname.match(/^\/interaction\/([\w-]+)(\/login)?$/);
    if (!match) return callback(req, res);
    try {
      const details = await provider.interactionDetails(req, res);
      if (details.uid !== match[1]) throw new Error('interaction mismatch');
      if (req.method === 'GET') {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
        return res.end(loginPage(details.uid));
      }
      if (req.method === 'POST' && match[2]) {
        const form = await readBody(req);
        const login = form.get('login') || '';
        const account = accounts.get(login);
        const password = form.get('password') || '';
        if (!account || !password || !passwordMatches(account.password, password)) {
          res.writeHead(401, { 'content-type': 'text/html; charset=utf-8' });
          return res.end(loginPage(details.uid, 'Wrong user name or password'));
        }
        return provider.interactionFinished(
          req,
          res,
          { login: { accountId: login } },
          { mergeWithLastSubmission: false },
        );
      }
      res.writeHead(405);
      return res.end();
    } catch (err) {
      res.writeHead(400, { 'content-type': 'text/plain' });
      return res.end(`interaction error: ${err.message}`);
    }
  });
  server.listen(port, host, () => {
    process.stdout.write(`READY ${issuer}\n`);
  });
  const stop = () => server.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
