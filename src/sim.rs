//! Power-loss simulation (see module docs).
