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
    #[error("messages[{index}] carries {present} but not {missing}: an assistant message carries all of prompt_token_ids, generation_token_ids and generation_log_probs, or none")]
    PartialTokenFields {
        index: usize,
        present: &'static str,
        missing: &'static str,
    },
    #[error("messages[{index}].generation_log_probs has {log_probs} entries for {tokens} generation_token_ids")]
    LogProbsLength {
        index: usize,
        log_probs: usize,
        tokens: usize,
    },
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

/// `generation_log_probs` of a message: present (a list of numbers) or not.
fn log_prob_count(message: &Value, index: usize) -> Result<Option<usize>, SpliceError> {
    const FIELD: &str = "generation_log_probs";
    match message.get(FIELD) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => Ok(Some(items.len())),
        Some(_) => Err(SpliceError::BadTokenField {
            index,
            field: FIELD,
        }),
    }
}

/// A message's token transport: all three fields, or none.
fn message_tokens(message: &Value, index: usize) -> Result<Option<Vec<u32>>, SpliceError> {
    let prompt = token_list(message, index, "prompt_token_ids")?;
    let generation = token_list(message, index, "generation_token_ids")?;
    let log_probs = log_prob_count(message, index)?;
    let fields = [
        ("prompt_token_ids", prompt.is_some()),
        ("generation_token_ids", generation.is_some()),
        ("generation_log_probs", log_probs.is_some()),
    ];
    let present = fields.iter().find(|(_, p)| *p);
    let missing = fields.iter().find(|(_, p)| !*p);
    match (present, missing) {
        (None, _) => return Ok(None),
        (Some((present, _)), Some((missing, _))) => {
            return Err(SpliceError::PartialTokenFields {
                index,
                present,
                missing,
            })
        }
        (Some(_), None) => {}
    }
    let (Some(mut tokens), Some(generation), Some(log_probs)) = (prompt, generation, log_probs)
    else {
        return Ok(None);
    };
    if log_probs != generation.len() {
        return Err(SpliceError::LogProbsLength {
            index,
            log_probs,
            tokens: generation.len(),
        });
    }
    tokens.extend(generation);
    Ok(Some(tokens))
}

/// The request's model prefix, if any: an explicit one wins over message IDs.
/// Every assistant message's token fields are checked, not only the last's.
pub fn find_prefix(
    messages: &[Value],
    required: Option<&[u32]>,
) -> Result<Option<ModelPrefix>, SpliceError> {
    let mut last = None;
    for (index, message) in messages.iter().enumerate() {
        if message.get("role").and_then(Value::as_str) != Some("assistant") {
            continue;
        }
        if let Some(tokens) = message_tokens(message, index)? {
            last = Some(ModelPrefix::Message { index, tokens });
        }
    }
    // An empty explicit prefix means no prefix (not a cut before the first EOS).
    match required {
        Some([]) => Ok(last),
        Some(tokens) => Ok(Some(ModelPrefix::Explicit(tokens.to_vec()))),
        None => Ok(last),
    }
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

/// The prompt: `prefix` unchanged, then `full` after its `k`-th EOS token
/// (1-based) when the prefix ends on a stop token of its own, or from that
/// EOS token onward when it does not (a turn cut by length).
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
    let ends_on_stop = prefix.last().is_some_and(|t| eos.contains(t));
    let rest = if ends_on_stop { cut + 1 } else { cut };
    let mut out = prefix.to_vec();
    out.extend_from_slice(&full[rest..]);
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
        // A turn that ended on a secondary stop token keeps it; the template's
        // closing token is the one dropped.
        let two_stops = [2, 3];
        let sampled = [10, 2, 11, 2, 60, 61, 62, 3];
        assert_eq!(
            splice(&full, &sampled, 3, &two_stops).unwrap(),
            vec![10, 2, 11, 2, 60, 61, 62, 3, 12, 2, 13]
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
            json!({"role": "assistant", "content": "b", "prompt_token_ids": [1], "generation_token_ids": [2], "generation_log_probs": [-0.5]}),
            json!({"role": "user", "content": "c"}),
            json!({"role": "assistant", "content": "d", "prompt_token_ids": [1, 2, 3], "generation_token_ids": [4, 5], "generation_log_probs": [-0.1, -0.2]}),
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
        // An empty explicit prefix is no prefix.
        assert_eq!(
            find_prefix(&messages, Some(&[])).unwrap(),
            find_prefix(&messages, None).unwrap()
        );
        let bad = vec![
            json!({"role": "assistant", "prompt_token_ids": "x", "generation_token_ids": [1], "generation_log_probs": [0.0]}),
        ];
        assert!(find_prefix(&bad, None).is_err());
    }

    #[test]
    fn partial_token_fields_are_refused_by_message_and_field() {
        let partial = vec![
            json!({"role": "user", "content": "a"}),
            json!({"role": "assistant", "content": "b", "prompt_token_ids": [1], "generation_token_ids": [2]}),
        ];
        assert_eq!(
            find_prefix(&partial, None),
            Err(SpliceError::PartialTokenFields {
                index: 1,
                present: "prompt_token_ids",
                missing: "generation_log_probs"
            })
        );
        let only_log_probs =
            vec![json!({"role": "assistant", "content": "b", "generation_log_probs": [-1.0]})];
        let err = find_prefix(&only_log_probs, None).unwrap_err().to_string();
        assert!(
            err.contains("messages[0]") && err.contains("prompt_token_ids"),
            "{err}"
        );
        let short = vec![
            json!({"role": "assistant", "prompt_token_ids": [1], "generation_token_ids": [2, 3], "generation_log_probs": [-1.0]}),
        ];
        assert!(matches!(
            find_prefix(&short, None),
            Err(SpliceError::LogProbsLength { .. })
        ));
    }
}
