// SPDX-License-Identifier: Apache-2.0
//! URL, header and JSON-body templates.
