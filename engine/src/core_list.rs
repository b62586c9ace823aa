//! Core identifiers and the core-list syntax (`0,1`, `0-3`, `0-3,8`).
//!
//! A `CoreId` names one CPU the engine pins a reactor to. The list parser is the single place
//! that turns user text into cores, so every binary accepts the same forms and reports the same
//! errors.

use std::fmt;

/// Most cores one engine drives. Reactor tables are sized by this at start.
pub const CORES_MAX: usize = 1024;

/// One CPU, as numbered by the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CoreId(u32);

impl CoreId {
    /// The one checked constructor: refuses ids at or above [`CORES_MAX`].
    pub fn new(id: u32) -> Result<CoreId, CoreListError> {
        if (id as usize) < CORES_MAX {
            Ok(CoreId(id))
        } else {
            Err(CoreListError::TooLarge { core: id })
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for CoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoreListError {
    #[error("core list is empty")]
    Empty,
    #[error("core list item '{item}' is not a number or a range like 0-3")]
    Syntax { item: String },
    #[error("core range '{item}' runs backwards")]
    Backwards { item: String },
    #[error("core {core} is listed twice")]
    Duplicate { core: u32 },
    #[error("core {core} is beyond the supported maximum of {}", CORES_MAX - 1)]
    TooLarge { core: u32 },
}

/// An ordered, duplicate-free list of cores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreList(Vec<CoreId>);

impl CoreList {
    /// Parses `0,1`, `0-3` and mixtures such as `0-3,8`.
    pub fn parse(text: &str) -> Result<CoreList, CoreListError> {
        let mut cores = Vec::new();
        for item in text.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(if text.trim().is_empty() {
                    CoreListError::Empty
                } else {
                    CoreListError::Syntax { item: item.into() }
                });
            }
            let (lo, hi) = parse_item(item)?;
            for id in lo..=hi {
                let core = CoreId::new(id)?;
                if cores.contains(&core) {
                    return Err(CoreListError::Duplicate { core: id });
                }
                cores.push(core);
            }
        }
        Ok(CoreList(cores))
    }

    /// The first `count` cores, `0..count`.
    pub fn first(count: u32) -> Result<CoreList, CoreListError> {
        if count == 0 {
            return Err(CoreListError::Empty);
        }
        (0..count)
            .map(CoreId::new)
            .collect::<Result<_, _>>()
            .map(CoreList)
    }

    pub fn as_slice(&self) -> &[CoreId] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn parse_item(item: &str) -> Result<(u32, u32), CoreListError> {
    let number = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| CoreListError::Syntax { item: item.into() })
    };
    match item.split_once('-') {
        None => {
            let id = number(item)?;
            Ok((id, id))
        }
        Some((lo, hi)) => {
            let (lo, hi) = (number(lo)?, number(hi)?);
            if lo > hi {
                return Err(CoreListError::Backwards { item: item.into() });
            }
            if hi as usize >= CORES_MAX {
                return Err(CoreListError::TooLarge { core: hi });
            }
            Ok((lo, hi))
        }
    }
}

impl std::str::FromStr for CoreList {
    type Err = CoreListError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CoreList::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &CoreList) -> Vec<u32> {
        list.as_slice().iter().map(|c| c.get()).collect()
    }

    #[test]
    fn parses_lists_ranges_and_mixtures() {
        assert_eq!(ids(&CoreList::parse("0,1").unwrap()), [0, 1]);
        assert_eq!(ids(&CoreList::parse("0-3").unwrap()), [0, 1, 2, 3]);
        assert_eq!(ids(&CoreList::parse("2, 0-1 ,7").unwrap()), [2, 0, 1, 7]);
    }

    #[test]
    fn rejects_bad_lists_with_named_errors() {
        assert_eq!(CoreList::parse(""), Err(CoreListError::Empty));
        assert!(matches!(
            CoreList::parse("a"),
            Err(CoreListError::Syntax { .. })
        ));
        assert!(matches!(
            CoreList::parse("0,,1"),
            Err(CoreListError::Syntax { .. })
        ));
        assert!(matches!(
            CoreList::parse("3-1"),
            Err(CoreListError::Backwards { .. })
        ));
        assert_eq!(
            CoreList::parse("1,0-2"),
            Err(CoreListError::Duplicate { core: 1 })
        );
        assert_eq!(
            CoreList::parse("0-5000"),
            Err(CoreListError::TooLarge { core: 5000 })
        );
    }
}
