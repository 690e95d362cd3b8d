// Copyright 2026 the k8shell authors
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.
//
//! OpenSSH's host key rotation extension, server side (OpenSSH's PROTOCOL
//! file, "hostkeys-00@openssh.com"): after authentication the server lists
//! all its host keys in a global request without reply; a client that
//! does not know some of them asks the server to prove it holds them, and
//! the server answers with one signature per asked-for key over
//! `string "hostkeys-prove-00@openssh.com" || string session_id ||
//! string key blob`.

use std::sync::Arc;

use bytes::Bytes;
use ssh_encoding::Encode;
use ssh_key::{Algorithm, HashAlg};

use super::Session;
use crate::helpers::sign_with_hash_alg;
use crate::keys::key::PrivateKeyWithHashAlg;
use crate::{Error, msg};

const ANNOUNCE: &str = "hostkeys-00@openssh.com";
const PROVE: &str = "hostkeys-prove-00@openssh.com";

impl Session {
    /// Sends `hostkeys-00@openssh.com` once, when the configuration asks
    /// for it. Called as the session becomes authenticated.
    pub(crate) fn announce_host_keys(&mut self) -> Result<(), Error> {
        if !self.common.config.announce_host_keys || self.host_keys_announced {
            return Ok(());
        }
        self.host_keys_announced = true;
        let mut blobs = Vec::with_capacity(self.common.config.keys.len());
        for key in &self.common.config.keys {
            blobs.push(key.public_key().to_bytes()?);
        }
        if let Some(ref mut enc) = self.common.encrypted {
            push_packet!(enc.write, {
                enc.write.push(msg::GLOBAL_REQUEST);
                ANNOUNCE.encode(&mut enc.write)?;
                false.encode(&mut enc.write)?;
                for blob in &blobs {
                    blob.encode(&mut enc.write)?;
                }
            });
        }
        Ok(())
    }

    /// The body of the success reply to `hostkeys-prove-00@openssh.com`
    /// for the key blobs the client sent: a signature per key, in order.
    /// A blob that is not one of this server's keys fails the request.
    pub(crate) fn prove_host_keys(&self, blobs: &[Bytes]) -> Result<Vec<u8>, Error> {
        let Some(enc) = self.common.encrypted.as_ref() else {
            return Err(Error::Inconsistent);
        };
        let mut reply = Vec::new();
        for blob in blobs {
            let mut key = None;
            for candidate in &self.common.config.keys {
                if candidate.public_key().to_bytes()?.as_slice() == blob.as_ref() {
                    key = Some(candidate);
                    break;
                }
            }
            let key = key.ok_or(Error::UnknownKey)?;
            let mut signed = Vec::new();
            PROVE.encode(&mut signed)?;
            enc.session_id.as_ref().encode(&mut signed)?;
            blob.as_ref().encode(&mut signed)?;
            let hash = rsa_hash(key.algorithm(), self.host_key_algorithm.as_ref());
            let signature = sign_with_hash_alg(
                &PrivateKeyWithHashAlg::new(Arc::new(key.clone()), hash),
                &signed,
            )?;
            signature.encode(&mut reply)?;
        }
        Ok(reply)
    }
}

/// The hash of an RSA proof: the one of the key exchange when it used an
/// RSA key (clients verify with that algorithm), else SHA-512. Other key
/// types have no choice.
fn rsa_hash(key: Algorithm, negotiated: Option<&Algorithm>) -> Option<HashAlg> {
    match (key, negotiated) {
        (Algorithm::Rsa { .. }, Some(Algorithm::Rsa { hash })) => *hash,
        (Algorithm::Rsa { .. }, _) => Some(HashAlg::Sha512),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_proofs_follow_the_key_exchange() {
        let rsa = Algorithm::Rsa { hash: None };
        assert_eq!(rsa_hash(rsa.clone(), None), Some(HashAlg::Sha512));
        assert_eq!(
            rsa_hash(rsa.clone(), Some(&Algorithm::Ed25519)),
            Some(HashAlg::Sha512)
        );
        assert_eq!(
            rsa_hash(
                rsa.clone(),
                Some(&Algorithm::Rsa {
                    hash: Some(HashAlg::Sha256)
                })
            ),
            Some(HashAlg::Sha256)
        );
        assert_eq!(rsa_hash(rsa, Some(&Algorithm::Rsa { hash: None })), None);
        assert_eq!(rsa_hash(Algorithm::Ed25519, None), None);
    }
}
