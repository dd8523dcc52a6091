//! Money: prices per million tokens, costs in integer micro-units (1e-6 of the currency), rounded
//! up so a request is never billed less than it cost.

/// Price of one model, in micro-units per million tokens (USD 0.15 / 1M tokens = 150_000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input_micros_per_m: u64,
    pub output_micros_per_m: u64,
}

impl Price {
    /// From a price in whole currency units per million tokens (as price lists give it).
    pub fn from_per_million(input: f64, output: f64) -> Price {
        let micros = |v: f64| (v * 1_000_000.0).round().max(0.0) as u64;
        Price {
            input_micros_per_m: micros(input),
            output_micros_per_m: micros(output),
        }
    }

    /// Cost of `prompt` input and `completion` output tokens, in micro-units, rounded up.
    pub fn cost_micros(&self, prompt: u64, completion: u64) -> u64 {
        let n = prompt as u128 * self.input_micros_per_m as u128
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
}
