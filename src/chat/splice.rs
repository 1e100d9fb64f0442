//! Keeping multi-turn rollouts on-policy (CONTRACT.md, "Keeping multi-turn
//! rollouts on-policy").
//!
//! A later turn's prompt must begin with the exact tokens of earlier turns, not
//! a re-tokenization of their text. The model prefix comes from the last
//! assistant message carrying `prompt_token_ids` + `generation_token_ids`, or
//! from `required_prefix_token_ids`. The rendered prompt is cut at an EOS token
//! (counting EOS tokens, not positions, so templates that drop earlier
//! reasoning still splice right) and the prefix is put in front of the rest.

use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpliceError {
    #[error("messages[{index}].{field} must be a list of token IDs")]
    BadTokenField { index: usize, field: &'static str },
    #[error("cannot splice the on-policy prefix into the prompt: the rendered conversation has {found} end-of-sequence tokens, but the prefix ends after end-of-sequence token {needed}")]
    CutNotFound { needed: usize, found: usize },
}

/// Where the model prefix of a request comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelPrefix {
    /// `prompt_token_ids + generation_token_ids` of `messages[index]`.
    Message { index: usize, tokens: Vec<u32> },
    /// `required_prefix_token_ids` of the request.
    Explicit(Vec<u32>),
}

fn token_list(
    message: &Value,
    index: usize,
    field: &'static str,
) -> Result<Option<Vec<u32>>, SpliceError> {
    match message.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .map(Some)
            .ok_or(SpliceError::BadTokenField { index, field }),
        Some(_) => Err(SpliceError::BadTokenField { index, field }),
    }
}

/// The request's model prefix, if any: an explicit one wins over message IDs.
pub fn find_prefix(
    messages: &[Value],
    required: Option<&[u32]>,
) -> Result<Option<ModelPrefix>, SpliceError> {
    if let Some(tokens) = required {
        return Ok(Some(ModelPrefix::Explicit(tokens.to_vec())));
    }
    for (index, message) in messages.iter().enumerate().rev() {
        if message.get("role").and_then(Value::as_str) != Some("assistant") {
            continue;
        }
        let prompt = token_list(message, index, "prompt_token_ids")?;
        let generation = token_list(message, index, "generation_token_ids")?;
        if let (Some(mut tokens), Some(generation)) = (prompt, generation) {
            tokens.extend(generation);
            return Ok(Some(ModelPrefix::Message { index, tokens }));
        }
    }
    Ok(None)
}

pub fn count_eos(tokens: &[u32], eos: &[u32]) -> usize {
    tokens.iter().filter(|t| eos.contains(t)).count()
}

/// `prefix` without a trailing EOS (the template writes its own).
pub fn without_trailing_eos<'a>(prefix: &'a [u32], eos: &[u32]) -> &'a [u32] {
    match prefix.last() {
        Some(last) if eos.contains(last) => &prefix[..prefix.len() - 1],
        _ => prefix,
    }
}

/// The prompt: `prefix` (minus a trailing EOS) followed by `full` from its
/// `k`-th EOS token (1-based) onward.
pub fn splice(
    full: &[u32],
    prefix: &[u32],
    k: usize,
    eos: &[u32],
) -> Result<Vec<u32>, SpliceError> {
    let found = count_eos(full, eos);
    let cut = full
        .iter()
        .enumerate()
        .filter(|(_, t)| eos.contains(t))
        .nth(k.saturating_sub(1))
        .map(|(i, _)| i)
        .filter(|_| k > 0)
        .ok_or(SpliceError::CutNotFound { needed: k, found })?;
    let mut out = without_trailing_eos(prefix, eos).to_vec();
    out.extend_from_slice(&full[cut..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EOS: [u32; 1] = [2];

    #[test]
    fn splices_at_the_kth_eos() {
        // full: [sys 2] [user 2] [assistant-retokenized 2] [tool 2] [gen-prompt]
        let full = [10, 2, 11, 2, 50, 51, 2, 12, 2, 13];
        let prefix = [10, 2, 11, 2, 60, 61, 62, 2];
        assert_eq!(
            splice(&full, &prefix, 3, &EOS).unwrap(),
            vec![10, 2, 11, 2, 60, 61, 62, 2, 12, 2, 13]
        );
        // A prefix cut off without EOS gets the template's EOS.
        assert_eq!(
            splice(&full, &prefix[..7], 3, &EOS).unwrap(),
            vec![10, 2, 11, 2, 60, 61, 62, 2, 12, 2, 13]
        );
        assert_eq!(
            splice(&full, &prefix, 9, &EOS),
            Err(SpliceError::CutNotFound {
                needed: 9,
                found: 4
            })
        );
    }

    #[test]
    fn last_assistant_message_with_ids_is_the_prefix() {
        let messages = vec![
            json!({"role": "user", "content": "a"}),
            json!({"role": "assistant", "content": "b", "prompt_token_ids": [1], "generation_token_ids": [2]}),
            json!({"role": "user", "content": "c"}),
            json!({"role": "assistant", "content": "d", "prompt_token_ids": [1, 2, 3], "generation_token_ids": [4, 5]}),
            json!({"role": "user", "content": "e"}),
        ];
        assert_eq!(
            find_prefix(&messages, None).unwrap(),
            Some(ModelPrefix::Message {
                index: 3,
                tokens: vec![1, 2, 3, 4, 5]
            })
        );
        assert_eq!(
            find_prefix(&messages, Some(&[7])).unwrap(),
            Some(ModelPrefix::Explicit(vec![7]))
        );
        let bad = vec![
            json!({"role": "assistant", "prompt_token_ids": "x", "generation_token_ids": [1]}),
        ];
        assert!(find_prefix(&bad, None).is_err());
    }
}
