//! The contextual classifier: which ad category a conversation is about, how sure we
//! are, and whether it touches a topic that must never carry an ad.
//!
//! Deterministic by construction: the text is lower-cased and split into words on
//! anything that is not a letter, digit or apostrophe; each category and sensitive topic
//! has a fixed lexicon of words and two-word phrases. A category's `hits` is how many
//! words (and phrases) of the text are in its lexicon. The winner is the category with
//! the most hits (ties broken by the order of `CATEGORIES`), and
//!
//! ```text
//! confidence = (winner hits / all category hits) × min(1, winner hits / 3)
//! ```
//!
//! so one stray keyword among others scores low, and three or more hits that all point
//! the same way score 1. A sensitive topic matches on any single hit: excluding an ad
//! wrongly costs a fraction of a cent, showing one next to a crisis costs trust.

/// Ad categories, in tie-break order.
pub const CATEGORIES: [&str; 5] = ["technology", "finance", "health", "entertainment", "education"];

/// The bit set of `names` among `CATEGORIES` (unknown names set no bit).
pub fn mask<S: AsRef<str>>(names: &[S]) -> u8 {
    names.iter().filter_map(|n| CATEGORIES.iter().position(|c| *c == n.as_ref())).fold(0, |m, i| m | (1 << i))
}

/// Sensitive topics the classifier knows; `ads_excluded_topics` picks from these.
pub const TOPICS: [&str; 3] = ["self_harm", "mental_health_crisis", "politics"];

const TECHNOLOGY: &[&str] = &[
    "computer", "computers", "software", "hardware", "programming", "program", "code", "coding", "python", "rust",
    "javascript", "typescript", "java", "golang", "compiler", "api", "database", "sql", "server", "cloud", "linux",
    "windows", "macos", "laptop", "gpu", "cpu", "smartphone", "phone", "app", "apps", "algorithm", "developer",
    "debug", "bug", "kubernetes", "docker", "network", "router", "wifi", "internet", "website", "browser", "ai",
    "llm", "machine learning", "neural", "data science", "github", "git", "function", "framework", "tech", "gadget",
];
const FINANCE: &[&str] = &[
    "money", "finance", "financial", "invest", "investing", "investment", "investments", "stock", "stocks", "bond",
    "bonds", "etf", "portfolio", "bank", "banking", "loan", "loans", "mortgage", "credit", "debt", "budget",
    "budgeting", "savings", "save money", "retirement", "pension", "tax", "taxes", "interest rate", "inflation",
    "crypto", "bitcoin", "ethereum", "trading", "dividend", "insurance", "accounting", "salary", "income", "price",
];
const HEALTH: &[&str] = &[
    "health", "healthy", "fitness", "exercise", "workout", "gym", "diet", "nutrition", "protein", "calories",
    "vitamin", "vitamins", "sleep", "doctor", "medicine", "medical", "symptom", "symptoms", "disease", "flu", "cold",
    "fever", "headache", "allergy", "running", "yoga", "weight", "muscle", "heart rate", "blood pressure",
    "diabetes", "dentist", "skin", "hospital", "recipe", "vegan", "cardio", "stretching",
];
const ENTERTAINMENT: &[&str] = &[
    "movie", "movies", "film", "films", "tv", "series", "show", "shows", "netflix", "music", "song", "songs", "album",
    "band", "concert", "game", "games", "gaming", "video game", "playstation", "xbox", "nintendo", "celebrity",
    "actor", "actress", "anime", "comic", "comics", "novel", "podcast", "streaming", "festival", "theater",
    "theatre", "party", "joke", "jokes", "fun", "hobby", "travel", "vacation",
];
const EDUCATION: &[&str] = &[
    "learn", "learning", "study", "studying", "school", "university", "college", "course", "courses", "class",
    "lesson", "lessons", "teacher", "student", "students", "exam", "exams", "homework", "tutorial", "degree",
    "math", "mathematics", "physics", "chemistry", "biology", "history", "language", "grammar", "essay",
    "scholarship", "curriculum", "lecture", "explain", "textbook", "certificate", "bootcamp", "teach",
];

const SELF_HARM: &[&str] = &[
    "suicide", "suicidal", "kill myself", "killing myself", "self harm", "self-harm", "selfharm", "cut myself",
    "cutting myself", "hurt myself", "hurting myself", "end my life", "overdose", "want to die",
];
const MENTAL_HEALTH_CRISIS: &[&str] = &[
    "panic attack", "panic attacks", "depressed", "depression", "hopeless", "breakdown", "mental breakdown",
    "can't go on", "cant go on", "crisis", "anxiety attack", "trauma", "ptsd", "grief", "abuse", "abused",
];
const POLITICS: &[&str] = &[
    "politics", "political", "election", "elections", "vote", "voting", "voter", "president", "presidential",
    "democrat", "democrats", "republican", "republicans", "parliament", "congress", "senate", "senator",
    "government", "prime minister", "ballot", "party leader", "left wing", "right wing", "immigration",
    "abortion", "referendum", "politician", "politicians",
];

fn lexicon(name: &str) -> &'static [&'static str] {
    match name {
        "technology" => TECHNOLOGY,
        "finance" => FINANCE,
        "health" => HEALTH,
        "entertainment" => ENTERTAINMENT,
        "education" => EDUCATION,
        "self_harm" => SELF_HARM,
        "mental_health_crisis" => MENTAL_HEALTH_CRISIS,
        "politics" => POLITICS,
        _ => &[],
    }
}

/// What the classifier found in a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    /// The best category, when any word matched.
    pub category: Option<&'static str>,
    pub confidence: f64,
    /// Sensitive topics that matched (from `TOPICS`).
    pub topics: Vec<&'static str>,
}

/// Lower-cased words of `text` and its two-word phrases (joined by one space; words
/// with an apostrophe are also matched without it).
fn terms(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '-'))
        .map(|w| w.trim_matches(|c| c == '\'' || c == '-'))
        .filter(|w| !w.is_empty())
        .collect();
    let mut out: Vec<String> = Vec::with_capacity(words.len() * 2);
    for (i, w) in words.iter().enumerate() {
        out.push((*w).to_owned());
        if w.contains('-') {
            out.push(w.replace('-', " "));
        }
        if let Some(next) = words.get(i + 1) {
            out.push(format!("{w} {next}"));
        }
    }
    out
}

/// Classifies `text` (the recent user messages, joined).
pub fn classify(text: &str) -> Context {
    let terms = terms(text);
    let hits = |name: &str| -> usize {
        let lex = lexicon(name);
        terms.iter().filter(|t| lex.contains(&t.as_str())).count()
    };
    let counts: Vec<(&'static str, usize)> = CATEGORIES.iter().map(|c| (*c, hits(c))).collect();
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    let mut best: Option<(&'static str, usize)> = None;
    for (c, n) in &counts {
        if *n > 0 && best.is_none_or(|(_, b)| *n > b) {
            best = Some((c, *n));
        }
    }
    let (category, confidence) = match best {
        Some((c, n)) => (Some(c), (n as f64 / total as f64) * (n as f64 / 3.0).min(1.0)),
        None => (None, 0.0),
    };
    let topics = TOPICS.iter().copied().filter(|t| hits(t) > 0).collect();
    Context { category, confidence, topics }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_dominant_category_with_confidence() {
        let c = classify("How do I debug a Rust compiler error in my Python and Rust code?");
        assert_eq!(c.category, Some("technology"));
        assert!((c.confidence - 1.0).abs() < 1e-9, "{c:?}");
        assert!(c.topics.is_empty());

        let c = classify("Should I invest my savings in stocks or bonds?");
        assert_eq!(c.category, Some("finance"));

        // One weak hit: low confidence.
        let c = classify("Tell me about the weather and my code");
        assert_eq!(c.category, Some("technology"));
        assert!(c.confidence < 0.5, "{c:?}");

        // Mixed: the share of hits lowers confidence.
        let c = classify("python code for my stock portfolio budget");
        assert_eq!(c.category, Some("finance"));
        assert!(c.confidence > 0.0 && c.confidence < 1.0, "{c:?}");

        let c = classify("Hello there");
        assert_eq!(c.category, None);
        assert_eq!(c.confidence, 0.0);
    }

    #[test]
    fn finds_sensitive_topics_on_a_single_hit() {
        assert_eq!(classify("I want to kill myself").topics, vec!["self_harm"]);
        assert_eq!(classify("I keep having panic attacks at school").topics, vec!["mental_health_crisis"]);
        assert_eq!(classify("Who should win the election?").topics, vec!["politics"]);
        assert!(classify("Write a Rust function").topics.is_empty());
    }

    #[test]
    fn is_deterministic_and_ties_go_to_the_first_category() {
        // One technology hit, one finance hit: technology comes first in CATEGORIES.
        let a = classify("laptop money");
        assert_eq!(a.category, Some("technology"));
        assert_eq!(a, classify("laptop money"));
    }
}
