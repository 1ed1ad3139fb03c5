// SPDX-License-Identifier: Apache-2.0
//! A refusal: what was denied and why, as one sentence for the caller and
//! the audit record (`call denied: parameter "to" ... of tool send_email`).

use keyward_proto::token::TokenId;

/// What a [`Denial`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// A call, direct or with a token.
    Call,
    /// Minting a token.
    Mint,
    /// Attenuating a bound token.
    Attenuation,
    /// A presented token: its id once its signature checked out.
    Token(Option<TokenId>),
    /// Revoking the token with this id.
    Revocation(TokenId),
    /// Any token operation on a broker without a state directory.
    Tokens,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::Call => f.write_str("call denied"),
            Denied::Mint => f.write_str("mint denied"),
            Denied::Attenuation => f.write_str("attenuation denied"),
            Denied::Token(None) => f.write_str("token denied"),
            Denied::Token(Some(id)) => write!(f, "token {id} denied"),
            Denied::Revocation(id) => write!(f, "revocation of {id} denied"),
            Denied::Tokens => f.write_str("tokens are disabled"),
        }
    }
}

/// A denial: one sentence, `{what}: {why}`, safe to show the caller and to
/// audit (secret parameter values never appear in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// What was denied.
    pub what: Denied,
    /// Why, completing the sentence; never a secret.
    pub why: String,
}

impl Denial {
    pub fn new(what: Denied, why: impl Into<String>) -> Denial {
        Denial {
            what,
            why: why.into(),
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.why)
    }
}

/// The denial as it goes on the wire.
impl From<Denial> for keyward_proto::Denial {
    fn from(denial: Denial) -> keyward_proto::Denial {
        keyward_proto::Denial {
            reason: denial.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_name_what_and_why() {
        let id = TokenId([0xab; 16]);
        let cases = [
            (Denied::Call, "call denied: no"),
            (Denied::Mint, "mint denied: no"),
            (Denied::Attenuation, "attenuation denied: no"),
            (Denied::Token(None), "token denied: no"),
            (Denied::Token(Some(id)), &format!("token {id} denied: no")),
            (
                Denied::Revocation(id),
                &format!("revocation of {id} denied: no"),
            ),
            (Denied::Tokens, "tokens are disabled: no"),
        ];
        for (what, want) in cases {
            let denial = Denial::new(what, "no");
            assert_eq!(denial.to_string(), want);
            assert_eq!(keyward_proto::Denial::from(denial).reason, want);
        }
    }
}
