// SPDX-License-Identifier: Apache-2.0
//! Redaction of credential values and their encodings.
