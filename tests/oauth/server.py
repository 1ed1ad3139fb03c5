#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A real OAuth 2.0 authorization server and a resource server on loopback,
for keyward's end-to-end tests (tests/tests/oauth.rs).

The token endpoint is authlib's (Flask integration): its RefreshTokenGrant
and ClientCredentialsGrant, client authentication (client_secret_basic and
client_secret_post) and error responses. Only storage is ours (in memory).
The resource server checks each bearer token with authlib's
ResourceProtector against the tokens the authorization server issued.

On start it prints one JSON line on stdout: the two ports, the client id
and secret, and a refresh token issued to the client. Control endpoints
(loopback, for the test only) on the authorization server:

  GET  /control/stats           counters, and every token value ever issued
  POST /control/settings        JSON: lifetime (s), rotate (bool), delay (s
                                before answering a token request),
                                reject_next (the next refresh fails with
                                invalid_grant), refuse_all (the resource
                                server refuses every token)
  POST /control/revoke-access   every access token issued so far is revoked
  POST /control/revoke-refresh  every refresh token is revoked
  POST /control/issue           a new refresh token (as re-authorizing gives)

Resource routes (bearer required): /api/me; hostile ones that echo the
token: /api/echo (whole), /api/fragment (all but its last 3 characters),
/api/hex (hex with spaces between bytes).
"""

import json
import secrets
import sys
import threading
import time

from authlib.integrations.flask_oauth2 import (
    AuthorizationServer,
    ResourceProtector,
    current_token,
)
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6750 import BearerTokenGenerator, BearerTokenValidator
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

CLIENT_ID = "keyward-test-client"
CLIENT_SECRET = "kwcs-" + secrets.token_urlsafe(24)
SCOPE = "mail.send mail.read"

lock = threading.Lock()
settings = {
    "lifetime": 3600,
    "rotate": True,
    "delay": 0.0,
    "reject_next": False,
    "refuse_all": False,
}
stats = {
    "token_requests": 0,
    "refresh_attempts": 0,
    "refreshed": 0,
    "client_credentials": 0,
    "rejected": 0,
    "resource_ok": 0,
    "resource_401": 0,
    "refresh_tokens_used": [],
}
tokens = []  # every Token issued
by_access = {}
by_refresh = {}


class Client(ClientMixin):
    def get_client_id(self):
        return CLIENT_ID

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        return scope or SCOPE

    def check_redirect_uri(self, redirect_uri):
        return False

    def check_client_secret(self, client_secret):
        return secrets.compare_digest(client_secret, CLIENT_SECRET)

    def check_endpoint_auth_method(self, method, endpoint):
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type):
        return False

    def check_grant_type(self, grant_type):
        return grant_type in ("refresh_token", "client_credentials")


CLIENT = Client()


class User:
    id = 1


USER = User()


class Token(TokenMixin):
    def __init__(self, data):
        self.access_token = data.get("access_token")
        self.refresh_token = data.get("refresh_token")
        self.scope = data.get("scope", SCOPE)
        self.expires_in = data.get("expires_in", 0)
        self.issued_at = time.time()
        self.access_revoked = False
        self.refresh_revoked = False

    def check_client(self, client):
        return client.get_client_id() == CLIENT_ID

    def get_scope(self):
        return self.scope

    def get_expires_in(self):
        return self.expires_in

    def is_expired(self):
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self):
        return self.access_revoked

    def get_user(self):
        return USER

    def get_client(self):
        return CLIENT


def remember(data):
    token = Token(data)
    with lock:
        tokens.append(token)
        if token.access_token:
            by_access[token.access_token] = token
        if token.refresh_token:
            by_refresh[token.refresh_token] = token
    return token


class RefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    @property
    def INCLUDE_NEW_REFRESH_TOKEN(self):
        return settings["rotate"]

    def authenticate_refresh_token(self, refresh_token):
        with lock:
            stats["refresh_tokens_used"].append(refresh_token)
            if settings["reject_next"]:
                settings["reject_next"] = False
                stats["rejected"] += 1
                return None
            token = by_refresh.get(refresh_token)
            if token is None or token.refresh_revoked:
                stats["rejected"] += 1
                return None
            return token

    def authenticate_user(self, refresh_token):
        return USER

    def revoke_old_credential(self, refresh_token):
        if settings["rotate"]:
            with lock:
                refresh_token.refresh_revoked = True


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


def save_token(token, req):
    remember(token)
    with lock:
        if req.grant_type == "refresh_token":
            stats["refreshed"] += 1
        else:
            stats["client_credentials"] += 1


auth_app = Flask("authorization-server")
server = AuthorizationServer(
    auth_app, query_client=lambda cid: CLIENT if cid == CLIENT_ID else None, save_token=save_token
)
server.register_token_generator(
    "default",
    BearerTokenGenerator(
        access_token_generator=lambda **kw: "kwat-" + secrets.token_urlsafe(30),
        refresh_token_generator=lambda **kw: "kwrt-" + secrets.token_urlsafe(36),
        expires_generator=lambda client, grant_type: settings["lifetime"],
    ),
)
server.register_grant(RefreshTokenGrant)
server.register_grant(ClientCredentialsGrant)


@auth_app.route("/oauth/token", methods=["POST"])
def issue_token():
    with lock:
        stats["token_requests"] += 1
        if request.form.get("grant_type") == "refresh_token":
            stats["refresh_attempts"] += 1
        delay = settings["delay"]
    if delay:
        time.sleep(delay)
    return server.create_token_response()


@auth_app.route("/control/stats")
def control_stats():
    with lock:
        body = dict(stats)
        body["access_tokens"] = [t.access_token for t in tokens if t.access_token]
        body["refresh_tokens"] = [t.refresh_token for t in tokens if t.refresh_token]
        body["client_secret"] = CLIENT_SECRET
        return jsonify(body)


@auth_app.route("/control/settings", methods=["POST"])
def control_settings():
    with lock:
        settings.update(request.get_json(force=True))
        return jsonify(settings)


@auth_app.route("/control/revoke-access", methods=["POST"])
def control_revoke_access():
    with lock:
        for token in tokens:
            token.access_revoked = True
    return jsonify(ok=True)


@auth_app.route("/control/issue", methods=["POST"])
def control_issue():
    token = remember({"access_token": None, "refresh_token": "kwrt-" + secrets.token_urlsafe(36), "scope": SCOPE})
    return jsonify(refresh_token=token.refresh_token)


@auth_app.route("/control/revoke-refresh", methods=["POST"])
def control_revoke_refresh():
    with lock:
        for token in tokens:
            token.refresh_revoked = True
    return jsonify(ok=True)


class Validator(BearerTokenValidator):
    def authenticate_token(self, token_string):
        with lock:
            if settings["refuse_all"]:
                return None
            return by_access.get(token_string)


require_oauth = ResourceProtector()
require_oauth.register_token_validator(Validator())
resource_app = Flask("resource-server")


@resource_app.after_request
def count(response):
    with lock:
        if response.status_code == 401:
            stats["resource_401"] += 1
        elif response.status_code == 200:
            stats["resource_ok"] += 1
    return response


@resource_app.route("/api/me")
@require_oauth()
def me():
    return jsonify(ok=True, client=current_token.get_client().get_client_id(), scope=current_token.scope)


def presented():
    return request.headers.get("Authorization", "").removeprefix("Bearer ")


@resource_app.route("/api/echo")
@require_oauth()
def echo():
    return jsonify(authorization=request.headers.get("Authorization"), note="echoed")


@resource_app.route("/api/fragment")
@require_oauth()
def fragment():
    return jsonify(debug="token was " + presented()[:-3])


@resource_app.route("/api/hex")
@require_oauth()
def hexed():
    return " ".join(f"{b:02x}" for b in presented().encode())


def main():
    initial = remember({"access_token": None, "refresh_token": "kwrt-" + secrets.token_urlsafe(36), "scope": SCOPE})
    auth = make_server("127.0.0.1", 0, auth_app, threaded=True)
    resource = make_server("127.0.0.1", 0, resource_app, threaded=True)
    for srv in (auth, resource):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(
        json.dumps(
            {
                "auth_port": auth.server_port,
                "resource_port": resource.server_port,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "refresh_token": initial.refresh_token,
            }
        ),
        flush=True,
    )
    # Exit when the test closes our stdin (or dies).
    sys.stdin.read()


if __name__ == "__main__":
    main()
