//! Inference: which provider serves a request and how its bytes get there and back.
//! `providers` is the registry of who is on line, `routing` scores and picks, `relay`
//! sends and fails over, `links` carries requests to workers that dialled in,
//! `health` keeps breakers and samples, `fleet_health` shares them across replicas
//! and keeps them in the database, `capacity` counts provider slots (fleet-wide
//! with Redis), `quality` the precision tiers, `delivered` and
//! `tokenizers` count what was delivered, `aggregate` turns a stream into one answer,
//! `egress` keeps provider calls off private networks.

pub mod aggregate;
pub mod capacity;
pub mod delivered;
pub mod egress;
pub mod fleet_health;
pub mod health;
pub mod links;
pub mod open_links;
pub mod providers;
pub mod quality;
pub mod relay;
pub mod routing;
pub mod tokenizers;
