use crate::model;

#[test]
fn round_trips_ascii_digits_accents_cjk_and_emoji() {
    let m = model();
    let tok = &m.tokenizer;
    for text in [
        "Hello, world! How are you today?",
        "1234567890 and 3.14159, 2+2=4",
        "Café, naïve façade, Ærøskøbing, ¿Qué tal?",
        "日本語のテキストと中文文本",
        "Emoji: 😀🚀👍🏽 family 👨‍👩‍👧",
        "  leading spaces\n\nnew lines\ttabs  ",
    ] {
        let ids = tok.encode(text);
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids), text, "round trip of {text:?} via {ids:?}");
    }
}

#[test]
fn encodes_like_the_reference_tokenizer() {
    let m = model();
    let tok = &m.tokenizer;
    // Special tokens are atomic and digits are split one by one (SmolLM pre-tokenizer).
    let ids = tok.encode("<|im_start|>user\n2024<|im_end|>");
    assert_eq!(ids.first(), tok.token_id("<|im_start|>").as_ref());
    assert_eq!(ids.last(), tok.token_id("<|im_end|>").as_ref());
    let digits: Vec<_> = ids[ids.len() - 5..ids.len() - 1].iter().map(|&t| tok.token_str(t).to_string()).collect();
    assert_eq!(digits, ["2", "0", "2", "4"]);
    // " Paris" is one token with the byte-level space marker.
    let paris = tok.encode(" Paris");
    assert_eq!(paris.len(), 1);
    assert_eq!(tok.token_str(paris[0]), "ĠParis");
}
