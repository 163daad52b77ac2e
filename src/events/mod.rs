//! Change events beyond the database: waking the watchers of an
//! organization when its events commit. One listening connection serves
//! every watcher; watchers read the events themselves, by sequence, from the
//! pool.

pub mod hub;
