//! Money: prices per million tokens of each token kind, costs in integer micro-units (1e-6 of the
//! currency).
//!
//! The one rounding rule: a call's cost is the sum, over its token kinds, of tokens × the kind's
//! price in micro-units per million tokens, divided by 1,000,000 once and rounded up. So a call is
//! never billed less than it cost, and by less than one micro-unit more; nothing is rounded per
//! kind or per token.

use super::Usage;

/// Price of one model, in micro-units per million tokens (USD 0.15 / 1M tokens = 150_000), per
/// token kind. Kinds a price list leaves out are filled in when the price is built (see
/// [`PriceList`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input_micros_per_m: u64,
    pub output_micros_per_m: u64,
    /// OpenAI cached prompt tokens.
    pub cached_input_micros_per_m: u64,
    /// Anthropic cache writes (`cache_creation_input_tokens`).
    pub cache_write_micros_per_m: u64,
    /// Anthropic cache reads (`cache_read_input_tokens`).
    pub cache_read_micros_per_m: u64,
    /// Input of an embeddings call.
    pub embedding_micros_per_m: u64,
}

/// A model's prices as a price list writes them: whole currency units per million tokens; the
/// optional kinds as `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PriceList {
    pub input: f64,
    pub output: f64,
    /// Default: `input`.
    pub cached_input: Option<f64>,
    /// Default: `input`.
    pub cache_write: Option<f64>,
    /// Default: `cached_input`, else `input`.
    pub cache_read: Option<f64>,
    /// Default: `input`.
    pub embedding: Option<f64>,
}

fn micros(v: f64) -> u64 {
    (v * 1_000_000.0).round().max(0.0) as u64
}

impl Price {
    /// From a price in whole currency units per million tokens (as price lists give it); every
    /// other kind at the input price.
    pub fn from_per_million(input: f64, output: f64) -> Price {
        Price::from_list(PriceList {
            input,
            output,
            ..PriceList::default()
        })
    }

    /// From a full price list entry, defaults applied.
    pub fn from_list(l: PriceList) -> Price {
        let cached = l.cached_input.unwrap_or(l.input);
        Price {
            input_micros_per_m: micros(l.input),
            output_micros_per_m: micros(l.output),
            cached_input_micros_per_m: micros(cached),
            cache_write_micros_per_m: micros(l.cache_write.unwrap_or(l.input)),
            cache_read_micros_per_m: micros(l.cache_read.unwrap_or(cached)),
            embedding_micros_per_m: micros(l.embedding.unwrap_or(l.input)),
        }
    }

    /// The price of an embeddings call: all its input at the embedding price (there is no
    /// output, nor any cache).
    pub fn for_embeddings(self) -> Price {
        let e = self.embedding_micros_per_m;
        Price {
            input_micros_per_m: e,
            cached_input_micros_per_m: e,
            cache_write_micros_per_m: e,
            cache_read_micros_per_m: e,
            ..self
        }
    }

    /// Cost of `usage`, in micro-units, by the one rounding rule (module doc).
    pub fn cost(&self, u: &Usage) -> u64 {
        let n = [
            (u.prompt, self.input_micros_per_m),
            (u.cached_input, self.cached_input_micros_per_m),
            (u.cache_write, self.cache_write_micros_per_m),
            (u.cache_read, self.cache_read_micros_per_m),
            (u.completion, self.output_micros_per_m),
        ]
        .iter()
        .map(|(t, p)| *t as u128 * *p as u128)
        .sum::<u128>();
        u64::try_from(n.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }

    /// Cost of `prompt` input and `completion` output tokens at the base prices, rounded up.
    pub fn cost_micros(&self, prompt: u64, completion: u64) -> u64 {
        self.cost(&Usage::plain(prompt, completion))
    }

    /// What to reserve for a call of `prompt` input tokens (an estimate, whatever kind they turn
    /// out to be) and at most `completion` output tokens: the input at the dearest input kind,
    /// so a prompt that writes a cache is still covered.
    pub fn reserve_micros(&self, prompt: u64, completion: u64) -> u64 {
        let dearest = self
            .input_micros_per_m
            .max(self.cached_input_micros_per_m)
            .max(self.cache_write_micros_per_m)
            .max(self.cache_read_micros_per_m);
        let n = prompt as u128 * dearest as u128
            + completion as u128 * self.output_micros_per_m as u128;
        u64::try_from(n.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_integer_micros_rounded_up() {
        let p = Price::from_per_million(0.15, 0.60);
        assert_eq!(p.input_micros_per_m, 150_000);
        assert_eq!(p.cost_micros(1_000, 0), 150);
        assert_eq!(p.cost_micros(1_000, 1_000), 750);
        assert_eq!(p.cost_micros(1, 0), 1, "a fraction of a micro is a micro");
        assert_eq!(p.cost_micros(0, 0), 0);
    }

    #[test]
    fn each_kind_at_its_price_rounded_once() {
        let p = Price::from_list(PriceList {
            input: 3.0,
            output: 15.0,
            cached_input: None,
            cache_write: Some(3.75),
            cache_read: Some(0.30),
            embedding: None,
        });
        assert_eq!(
            p.cached_input_micros_per_m, 3_000_000,
            "cached defaults to input"
        );
        let u = Usage {
            prompt: 1,
            cache_write: 1,
            cache_read: 1,
            completion: 1,
            ..Usage::default()
        };
        // 3 + 3.75 + 0.30 + 15 = 22.05 micros: one rounding, 23.
        assert_eq!(p.cost(&u), 23);
        assert_eq!(p.reserve_micros(1, 1), 19, "3.75 + 15, rounded up");
        let openai = Price::from_list(PriceList {
            input: 2.5,
            output: 10.0,
            cached_input: Some(1.25),
            ..PriceList::default()
        });
        assert_eq!(
            openai.cache_read_micros_per_m, 1_250_000,
            "reads default to cached"
        );
        let e = Price::from_list(PriceList {
            input: 1.0,
            output: 0.0,
            embedding: Some(0.02),
            ..PriceList::default()
        })
        .for_embeddings();
        assert_eq!(e.cost_micros(1_000_000, 0), 20_000);
    }
}
