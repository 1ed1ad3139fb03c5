// SPDX-License-Identifier: Apache-2.0
//! Sequence decoding that never trusts a peer-supplied length for
//! allocation.
//!
//! serde's own `Vec` impl pre-allocates up to 1 MiB from the length prefix,
//! which a 10-byte frame can claim. Here the pre-allocation is capped so the
//! vector only grows as elements actually arrive from the (bounded) frame.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};

/// Elements pre-allocated at most, whatever the length prefix says.
const MAX_PREALLOC: usize = 16;

/// `deserialize_with` helper for `Vec<T>` fields.
pub(crate) fn vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct BoundedVec<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedVec<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0).min(MAX_PREALLOC);
            let mut out = Vec::with_capacity(hint);
            while let Some(item) = seq.next_element()? {
                out.push(item);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_seq(BoundedVec(PhantomData))
}
